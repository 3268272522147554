"""``python -m armature.router`` (the standalone KV router)."""

from __future__ import annotations

import sys

from armature.router.main import main

sys.exit(main())
