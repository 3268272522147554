"""``python -m armature.mocker``: a worker on the simulated engine (flags as ``dynamo.mocker``)."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("PYTHONHASHSEED", "0")

from armature.sglang.main import mocker_main  # noqa: E402

sys.exit(mocker_main())
