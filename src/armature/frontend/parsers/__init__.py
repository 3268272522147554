"""Output parsers for the frontend: reasoning text and tool calls, split out of streamed model output.

Both kinds are incremental and hold one generated sequence's state: build one per sequence with
``reasoning_parser(name)`` / ``tool_call_parser(name)``, ``feed`` each piece of decoded text, and
``flush`` when the sequence ends. Run the reasoning parser first and feed the tool-call parser the
content it returns.
"""

from __future__ import annotations

from armature.frontend.parsers.reasoning import (
    REASONING_PARSER_NAMES,
    ReasoningFormat,
    ReasoningParser,
    reasoning_parser,
)
from armature.frontend.parsers.tool_calls import (
    TOOL_CALL_PARSER_NAMES,
    ParsedToolCall,
    ToolCallParser,
    tool_call_parser,
)

__all__ = [
    "REASONING_PARSER_NAMES",
    "TOOL_CALL_PARSER_NAMES",
    "ParsedToolCall",
    "ReasoningFormat",
    "ReasoningParser",
    "ToolCallParser",
    "reasoning_parser",
    "tool_call_parser",
]
