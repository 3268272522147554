"""Tool-call parsers: turn the tool-call markup a model writes into OpenAI tool calls as it streams.

Each model family announces calls in its own text format. A parser is fed the decoded output piece
by piece and returns the content that may be shown now plus the calls completed so far. Text that
may still become a call is held back, never shown as content; when the sequence ends, markup that
never became a valid call is given back as content verbatim, so nothing the model wrote is lost.
Malformed model output never raises.

Formats (names as ``--dyn-tool-call-parser``):

- ``hermes`` (Qwen2.5/Qwen3, Hermes): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
  blocks anywhere in the output. Content around them streams; each block is decided when it closes
  (a call, or its markup as content when the JSON is not a valid call).
- ``llama3_json`` (Llama 3.1/3.2): the whole output is calls when it opens with ``<|python_tag|>``
  or ``{``: ``{"name": ..., "parameters": {...}}`` objects separated by ``;`` or newlines. Such
  output is held entirely and decided at flush; other output streams as content.
- ``mistral``: ``[TOOL_CALLS]`` then a JSON array of ``{"name", "arguments"}`` objects, or
  ``name[ARGS]{...}`` segments. Content before the marker streams; each call is emitted as soon as
  its JSON closes.
- ``pythonic`` (Llama 3.2/4): the whole output is a Python list of calls with literal keyword
  arguments, ``[f(a=1), g()]``, optionally inside ``<|python_start|>`` … ``<|python_end|>``. Such
  output (opening with ``[``) is held entirely and decided at flush; other output streams.
"""

from __future__ import annotations

import ast
import json
import re
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

from armature.frontend.parsers.reasoning import partial_marker_len


@dataclass(frozen=True, slots=True)
class ParsedToolCall:
    name: str
    arguments: str  # a JSON object as text (json.dumps of the arguments dict, ensure_ascii=False)


class ToolCallParser(ABC):
    """One per generated sequence."""

    __slots__ = ()
    # True when its markers are special tokens the detokenizer would skip.
    needs_special_tokens: bool = False

    @abstractmethod
    def feed(self, text: str) -> tuple[str, list[ParsedToolCall]]:
        """Content that may be shown now, and tool calls completed by this text."""

    @abstractmethod
    def flush(self) -> tuple[str, list[ParsedToolCall]]:
        """End of the sequence: calls completed now; markup that never became a valid call is
        returned as content, so no text is ever lost."""


def _reject_constant(token: str) -> object:
    # NaN and Infinity are not JSON; re-serialising them would hand clients text they cannot parse.
    raise ValueError(f"non-finite number {token}")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _arguments_text(value: object) -> str | None:
    """Arguments as JSON object text, or None when they are not an object. Some models send the
    object already serialised as a JSON string; that is unwrapped."""
    if value is None:
        value = {}
    try:
        if isinstance(value, str):
            value = _DECODER.decode(value)
        if not isinstance(value, dict):
            return None
        return json.dumps(value, ensure_ascii=False)
    except (ValueError, RecursionError):
        return None


def _call_from_object(obj: object, argument_keys: tuple[str, ...] = ("arguments",)) -> ParsedToolCall | None:
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    if not isinstance(name, str) or not name.strip():
        return None
    # A call without arguments is a call of a function that takes none.
    value = next((obj[key] for key in argument_keys if key in obj), None)
    arguments = _arguments_text(value)
    if arguments is None:
        return None
    return ParsedToolCall(name.strip(), arguments)


class HermesToolCallParser(ToolCallParser):
    """``<tool_call>`` JSON ``</tool_call>`` blocks between ordinary content."""

    __slots__ = ("_held", "_in_block")
    START = "<tool_call>"
    END = "</tool_call>"

    def __init__(self) -> None:
        self._in_block = False
        # Outside a block: a possibly-partial start marker. Inside: the block's text so far.
        self._held = ""

    def feed(self, text: str) -> tuple[str, list[ParsedToolCall]]:
        buf, self._held = self._held + text, ""
        content: list[str] = []
        calls: list[ParsedToolCall] = []
        while True:
            if not self._in_block:
                at = buf.find(self.START)
                if at == -1:
                    keep = len(buf) - partial_marker_len(buf, self.START)
                    content.append(buf[:keep])
                    self._held = buf[keep:]
                    break
                content.append(buf[:at])
                buf = buf[at + len(self.START):]
                self._in_block = True
                continue
            at = buf.find(self.END)
            if at == -1:
                self._held = buf
                break
            body = buf[:at]
            buf = buf[at + len(self.END):]
            self._in_block = False
            call = self._decode(body)
            if call is None:
                # Decided now rather than at flush so that the content after it keeps its order.
                content.append(self.START + body + self.END)
            else:
                calls.append(call)
        return "".join(content), calls

    def flush(self) -> tuple[str, list[ParsedToolCall]]:
        held, self._held = self._held, ""
        if self._in_block:
            self._in_block = False
            return self.START + held, []
        return held, []

    @staticmethod
    def _decode(body: str) -> ParsedToolCall | None:
        try:
            obj = _DECODER.decode(body.strip())
        except (ValueError, RecursionError):
            return None
        return _call_from_object(obj)


_Mode = Literal["undecided", "content", "calls"]


class _WholeOutputParser(ToolCallParser):
    """Formats where the output, from its first non-blank character, is either entirely calls or
    entirely content. Content streams as soon as its opening rules calls out; output that opens like
    calls is held and decided at flush, since the format has no end marker that says it is done."""

    __slots__ = ("_held", "_mode")
    OPENERS: tuple[str, ...] = ()

    def __init__(self) -> None:
        self._mode: _Mode = "undecided"
        self._held = ""

    def feed(self, text: str) -> tuple[str, list[ParsedToolCall]]:
        if self._mode == "content":
            return text, []
        self._held += text
        if self._mode == "calls":
            return "", []
        lead = self._held.lstrip()
        if any(lead.startswith(opener) for opener in self.OPENERS):
            self._mode = "calls"
            return "", []
        # Blank so far, or a special-token opener cut short: the next piece decides.
        if any(opener.startswith(lead) for opener in self.OPENERS):
            return "", []
        self._mode = "content"
        out, self._held = self._held, ""
        return out, []

    def flush(self) -> tuple[str, list[ParsedToolCall]]:
        held, self._held = self._held, ""
        if self._mode == "calls":
            calls = self._parse(held)
            if calls:
                return "", calls
        return held, []

    @abstractmethod
    def _parse(self, text: str) -> list[ParsedToolCall] | None:
        """The calls the whole held output is, or None when it is not calls."""


class Llama3JsonToolCallParser(_WholeOutputParser):
    """Llama 3.1/3.2 JSON calls: ``<|python_tag|>``? ``{"name", "parameters"}`` (``;`` ``{...}``)*."""

    __slots__ = ()
    needs_special_tokens = True
    PYTHON_TAG = "<|python_tag|>"
    OPENERS = (PYTHON_TAG, "{")
    # End-of-turn tokens may reach the text when special tokens are kept.
    _TRAILERS = ("<|eom_id|>", "<|eot_id|>")

    def _parse(self, text: str) -> list[ParsedToolCall] | None:
        body = text.strip().removeprefix(self.PYTHON_TAG)
        for trailer in self._TRAILERS:
            body = body.rstrip().removesuffix(trailer)
        calls: list[ParsedToolCall] = []
        pos = 0
        while True:
            while pos < len(body) and (body[pos].isspace() or body[pos] == ";"):
                pos += 1
            if pos == len(body):
                return calls or None
            try:
                obj, pos = _DECODER.raw_decode(body, pos)
            except (ValueError, RecursionError):
                return None
            call = _call_from_object(obj, ("parameters", "arguments"))
            if call is None:
                return None
            calls.append(call)


class _NotLiteral(Exception):
    pass


def _literal(node: ast.expr) -> object:
    """The JSON-compatible value of a literal expression; raises _NotLiteral for anything else
    (names, calls, tuples, sets, bytes, …), so that no model-written code is ever evaluated."""
    if isinstance(node, ast.Constant):
        value = node.value
        if value is None or isinstance(value, (str, bool, int)):
            return value
        if isinstance(value, float) and _finite(value):
            return value
        raise _NotLiteral
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        # Negative numbers parse as a unary minus applied to a constant.
        operand = node.operand
        value = operand.value if isinstance(operand, ast.Constant) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if _finite(value):
                return -value if isinstance(node.op, ast.USub) else value
        raise _NotLiteral
    if isinstance(node, ast.List):
        return [_literal(item) for item in node.elts]
    if isinstance(node, ast.Dict):
        out: dict[str, object] = {}
        for key_node, value_node in zip(node.keys, node.values, strict=True):
            key = None if key_node is None else _literal(key_node)  # None: a ``**mapping``
            if not isinstance(key, str):
                raise _NotLiteral
            out[key] = _literal(value_node)
        return out
    raise _NotLiteral


def _finite(value: float) -> bool:
    return float("-inf") < value < float("inf")  # False for NaN as well


def _dotted_name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted_name(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


class PythonicToolCallParser(_WholeOutputParser):
    """Llama 3.2/4 pythonic calls: ``[get_weather(city="Paris", days=3), ping()]``."""

    __slots__ = ()
    START = "<|python_start|>"
    END = "<|python_end|>"
    OPENERS = (START, "[")

    def _parse(self, text: str) -> list[ParsedToolCall] | None:
        body = text.strip()
        if body.startswith(self.START):
            body = body[len(self.START):].rstrip().removesuffix(self.END)
        try:
            # A model's "C:\dir" has an invalid escape to Python: not worth a warning per request.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tree = ast.parse(body.strip(), mode="eval")
            if not isinstance(tree.body, ast.List) or not tree.body.elts:
                return None
            return [self._call(node) for node in tree.body.elts]
        except (SyntaxError, ValueError, RecursionError, MemoryError, _NotLiteral):
            return None

    @staticmethod
    def _call(node: ast.expr) -> ParsedToolCall:
        if not isinstance(node, ast.Call) or node.args:
            raise _NotLiteral
        name = _dotted_name(node.func)
        if name is None:
            raise _NotLiteral
        arguments: dict[str, object] = {}
        for keyword in node.keywords:
            if keyword.arg is None or keyword.arg in arguments:
                raise _NotLiteral
            arguments[keyword.arg] = _literal(keyword.value)
        return ParsedToolCall(name, json.dumps(arguments, ensure_ascii=False))


_Scan = Literal["more", "invalid", "done"]
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")


class MistralToolCallParser(ToolCallParser):
    """``[TOOL_CALLS]`` then ``[{"name", "arguments"}, ...]`` (older models) or ``name[ARGS]{...}``
    segments, each optionally behind its own ``[TOOL_CALLS]`` (newer models)."""

    __slots__ = ("_held", "_mode")
    needs_special_tokens = True
    MARKER = "[TOOL_CALLS]"
    ARGS = "[ARGS]"
    CALL_ID = "[CALL_ID]"
    # Every marker and every JSON object, array or string ends with one of these, so a pending call
    # can only complete (or prove invalid) on a piece that holds one; a bare number or literal as
    # arguments is invalid either way and is given back as content all the same.
    _CLOSERS = ']}"'

    def __init__(self) -> None:
        # "plain": markup that was not a valid call was met; the rest of the output is content.
        self._mode: Literal["content", "calls", "plain"] = "content"
        # "content": a possibly-partial marker. "calls": text after the last complete call,
        # markers included, so that it can be given back verbatim.
        self._held = ""

    def feed(self, text: str) -> tuple[str, list[ParsedToolCall]]:
        if self._mode == "plain":
            return text, []
        if self._mode == "calls" and not any(c in text for c in self._CLOSERS):
            # Re-decoding the pending call on every piece would be quadratic in its length.
            self._held += text
            return "", []
        buf, self._held = self._held + text, ""
        content: list[str] = []
        calls: list[ParsedToolCall] = []
        while True:
            if self._mode == "content":
                at = buf.find(self.MARKER)
                if at == -1:
                    keep = len(buf) - partial_marker_len(buf, self.MARKER)
                    content.append(buf[:keep])
                    self._held = buf[keep:]
                    break
                content.append(buf[:at])
                buf = buf[at:]
                self._mode = "calls"
                continue
            state, found, end = self._scan(buf)
            if state == "done":
                calls += found
                buf = buf[end:]
                continue
            if state == "invalid":
                self._mode = "plain"
                content.append(buf)
            else:
                self._held = buf
            break
        return "".join(content), calls

    def flush(self) -> tuple[str, list[ParsedToolCall]]:
        held, self._held = self._held, ""
        return held, []

    def _scan(self, buf: str) -> tuple[_Scan, list[ParsedToolCall], int]:
        """Look for one complete call (or array of calls) at the start of ``buf``."""
        pos = _skip_blank(buf, 0)
        while buf.startswith(self.MARKER, pos):
            pos = _skip_blank(buf, pos + len(self.MARKER))
        rest = buf[pos:]
        if self.MARKER.startswith(rest):
            return "more", [], 0
        if rest[0] in "[{":
            try:
                obj, end = _DECODER.raw_decode(buf, pos)
            except (ValueError, RecursionError):
                # Unfinished, or never valid: only the end of the sequence can tell.
                return "more", [], 0
            items = obj if isinstance(obj, list) else [obj]
            calls = [_call_from_object(item) for item in items]
            if not calls or any(call is None for call in calls):
                return "invalid", [], 0
            return "done", [call for call in calls if call is not None], end
        at = buf.find(self.ARGS, pos)
        if at == -1:
            return "more", [], 0
        name = buf[pos:at].split(self.CALL_ID, 1)[0].strip()
        if not _NAME.fullmatch(name):
            return "invalid", [], 0
        start = _skip_blank(buf, at + len(self.ARGS))
        try:
            value, end = _DECODER.raw_decode(buf, start)
        except (ValueError, RecursionError):
            return "more", [], 0
        arguments = _arguments_text(value)
        if arguments is None or value is None:
            return "invalid", [], 0
        return "done", [ParsedToolCall(name, arguments)], end


def _skip_blank(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


_PARSERS: dict[str, type[ToolCallParser]] = {
    "hermes": HermesToolCallParser,
    "llama3_json": Llama3JsonToolCallParser,
    "mistral": MistralToolCallParser,
    "pythonic": PythonicToolCallParser,
}

TOOL_CALL_PARSER_NAMES: tuple[str, ...] = tuple(_PARSERS)


def tool_call_parser(name: str) -> ToolCallParser:
    """A fresh parser for one sequence; ``name`` is one of ``TOOL_CALL_PARSER_NAMES``."""
    cls = _PARSERS.get(name)
    if cls is None:
        raise ValueError(
            f"unknown tool call parser {name!r}; known parsers: {', '.join(TOOL_CALL_PARSER_NAMES)}"
        )
    return cls()
