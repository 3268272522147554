"""Protocol version carried by every request-plane frame and event envelope.

Bump it whenever a wire struct changes incompatibly; peers that disagree fail with a clear
error instead of a msgpack decode exception deep in a handler.
"""

from __future__ import annotations

PROTOCOL_VERSION = 1
