"""The native engine. ``from armature.engine import Engine`` is the offline engine
(``NativeEngine``); the typed interface every engine implements lives in ``armature.engine.api``.

Exports resolve lazily so that importing ``armature.engine.api`` (frontend, router, worker
handlers) does not load torch and the model code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from armature.engine.api import SamplingParams
    from armature.engine.engine import NativeEngine
    from armature.engine.server_args import ServerArgs

    Engine = NativeEngine

__all__ = ["Engine", "NativeEngine", "SamplingParams", "ServerArgs"]


def __getattr__(name: str) -> Any:
    if name in ("Engine", "NativeEngine"):
        from armature.engine.engine import NativeEngine

        return NativeEngine
    if name == "ServerArgs":
        from armature.engine.server_args import ServerArgs

        return ServerArgs
    if name == "SamplingParams":
        from armature.engine.api import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'armature.engine' has no attribute {name!r}")
