"""Wire structs shared by every Armature process. Imports nothing else of Armature."""

from __future__ import annotations

from armature.protocols.version import PROTOCOL_VERSION

__all__ = ["PROTOCOL_VERSION"]
