"""Server-sent events framing: one ``data: …\\n\\n`` event per chunk, ``data: [DONE]`` last."""

from __future__ import annotations

DONE = b"data: [DONE]\n\n"


def frame(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"
