"""``python -m armature.frontend``: the OpenAI HTTP frontend as its own process."""

from __future__ import annotations

import sys

from armature.frontend.main import main

if __name__ == "__main__":
    sys.exit(main())
