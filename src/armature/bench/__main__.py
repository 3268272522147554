"""``python -m armature.bench`` (same as ``armature bench``)."""

from __future__ import annotations

import sys

from armature.bench.cli import main

sys.exit(main())
