"""Reasoning parsers: split a reasoning model's streamed output into reasoning and answer content.

Reasoning models wrap their chain of thought in markers (``<think>`` … ``</think>``, ``[THINK]`` …
``[/THINK]``); the frontend shows that text as ``reasoning_content`` and the rest as ``content``.
Output arrives in pieces cut anywhere, so a marker may be split across pieces: a parser holds back
only the tail that could still be the start of the marker it is waiting for, and releases it once
the next piece (or the end of the sequence) settles it.

A sequence has at most one reasoning block. After its end marker everything is content, so an
answer that mentions ``<think>`` (explaining the tag, say) is shown verbatim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

_Phase = Literal["before", "opening", "reasoning", "after"]


def partial_marker_len(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``: the part
    that must be held back because the next piece may complete the marker."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


@dataclass(frozen=True, slots=True)
class ReasoningFormat:
    start: str
    end: str
    # The chat template opened the block in the prompt, so the output begins inside it.
    starts_in_reasoning: bool = False


class ReasoningParser:
    """One per generated sequence. Splits text into reasoning and content as it streams."""

    __slots__ = ("_fmt", "_held", "_phase", "_strip")

    def __init__(self, fmt: ReasoningFormat) -> None:
        self._fmt = fmt
        # "opening": output that starts in reasoning may still repeat the start marker, which is
        # dropped; until that is settled the leading text is held.
        self._phase: _Phase = "opening" if fmt.starts_in_reasoning else "before"
        self._held = ""
        # Models put blank lines between the end marker and the answer; clients should not see them.
        self._strip = False

    def feed(self, text: str) -> tuple[str, str]:
        """(reasoning, content) that may be shown now. A possibly-partial start/end marker at the
        end of what was seen is held back until the next feed or flush decides it."""
        start, end = self._fmt.start, self._fmt.end
        buf, self._held = self._held + text, ""
        reasoning: list[str] = []
        content: list[str] = []
        while True:
            if self._phase == "opening":
                lead = buf.lstrip()
                if lead.startswith(start):
                    buf = lead[len(start):]
                    self._phase = "reasoning"
                elif start.startswith(lead):
                    self._held = buf
                    break
                else:
                    self._phase = "reasoning"
            elif self._phase == "before":
                at = buf.find(start)
                if at == -1:
                    keep = len(buf) - partial_marker_len(buf, start)
                    content.append(buf[:keep])
                    self._held = buf[keep:]
                    break
                content.append(buf[:at])
                buf = buf[at + len(start):]
                self._phase = "reasoning"
            elif self._phase == "reasoning":
                at = buf.find(end)
                if at == -1:
                    keep = len(buf) - partial_marker_len(buf, end)
                    reasoning.append(buf[:keep])
                    self._held = buf[keep:]
                    break
                reasoning.append(buf[:at])
                buf = buf[at + len(end):]
                self._phase = "after"
                self._strip = True
            else:
                if self._strip:
                    buf = buf.lstrip()
                    self._strip = not buf
                content.append(buf)
                break
        return "".join(reasoning), "".join(content)

    def flush(self) -> tuple[str, str]:
        """End of the sequence: whatever is held back, as (reasoning, content)."""
        held, self._held = self._held, ""
        if self._phase == "before":
            return "", held
        if self._phase in ("opening", "reasoning"):
            # No end marker came: all of it was thinking (a truncated or cut-off sequence).
            return held, ""
        return "", held


_THINK = ReasoningFormat("<think>", "</think>")
_DEEPSEEK_R1 = ReasoningFormat("<think>", "</think>", starts_in_reasoning=True)
_MISTRAL = ReasoningFormat("[THINK]", "[/THINK]")

# Dynamo's --dyn-reasoning-parser names, then SGLang's spellings of the same formats.
_FORMATS: dict[str, ReasoningFormat] = {
    "basic": _THINK,
    "qwen": _THINK,
    "deepseek_r1": _DEEPSEEK_R1,
    "mistral": _MISTRAL,
    "qwen3": _THINK,
    "deepseek-r1": _DEEPSEEK_R1,
}

REASONING_PARSER_NAMES: tuple[str, ...] = tuple(_FORMATS)


def reasoning_parser(name: str) -> ReasoningParser:
    """A fresh parser for one sequence; ``name`` is one of ``REASONING_PARSER_NAMES``."""
    fmt = _FORMATS.get(name)
    if fmt is None:
        raise ValueError(
            f"unknown reasoning parser {name!r}; known parsers: {', '.join(REASONING_PARSER_NAMES)}"
        )
    return ReasoningParser(fmt)
