"""``python -m armature`` is the ``armature`` command."""

from __future__ import annotations

import sys

from armature.cli import main

if __name__ == "__main__":
    sys.exit(main())
