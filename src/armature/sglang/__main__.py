"""``python -m armature.sglang``: one worker serving one model."""

from __future__ import annotations

import os
import sys

# As Dynamo does: child processes (engine subprocesses) get deterministic str hashes.
os.environ.setdefault("PYTHONHASHSEED", "0")

from armature.sglang.main import main  # noqa: E402

sys.exit(main())
