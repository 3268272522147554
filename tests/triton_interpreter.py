"""Lets the Triton kernels run without a GPU, under Triton's interpreter (tests only).

Call ``enable_without_cuda()`` before anything imports triton: the interpreter is chosen when
triton's own helpers are jitted at import. Returns False when triton is not installed.
"""

from __future__ import annotations

import importlib.util
import os

import torch


def enable_without_cuda() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    if torch.cuda.is_available():
        return True
    os.environ.setdefault("TRITON_INTERPRET", "1")
    from triton.runtime import interpreter

    if not getattr(interpreter, "_armature_scalar_index", False):
        # Triton 3.6's interpreter turns a loaded scalar into a Python int with int(array), which
        # numpy >= 2 refuses for a 1-element array; kernels that loop to a loaded length need it.
        patch = interpreter._patch_lang_tensor

        def with_index(tensor: object, scope: object) -> None:
            patch(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))  # type: ignore[attr-defined]

        interpreter._patch_lang_tensor = with_index
        interpreter._armature_scalar_index = True  # type: ignore[attr-defined]
    return True
