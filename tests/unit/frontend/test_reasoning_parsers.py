from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from armature.frontend.parsers import REASONING_PARSER_NAMES, ReasoningParser, reasoning_parser


def _run(parser: ReasoningParser, pieces: list[str]) -> tuple[str, str]:
    """What a client sees in total: (reasoning_content, content)."""
    reasoning: list[str] = []
    content: list[str] = []
    for piece in pieces:
        r, c = parser.feed(piece)
        reasoning.append(r)
        content.append(c)
    r, c = parser.flush()
    return "".join(reasoning) + r, "".join(content) + c


# (parser, output, expected reasoning, expected content)
CASES = [
    ("basic", "<think>plan it</think>\n\nAnswer.", "plan it", "Answer."),
    ("qwen", "<think>\nstep 1\n</think>\n\nThe answer is 4.", "\nstep 1\n", "The answer is 4."),
    ("qwen3", "Intro <think>hmm</think> tail", "hmm", "Intro tail"),
    ("basic", "No thinking at all.", "", "No thinking at all."),
    ("basic", "<think>cut off mid-thou", "cut off mid-thou", ""),
    ("basic", "<think>a</think>Use <think> tags like so.", "a", "Use <think> tags like so."),
    ("basic", "a < b and c </ d <thin", "", "a < b and c </ d <thin"),
    ("deepseek_r1", "I reason here.</think>\n\nDone.", "I reason here.", "Done."),
    ("deepseek-r1", "<think>\nrepeated opener</think>Done.", "\nrepeated opener", "Done."),
    ("deepseek_r1", "never closes", "never closes", ""),
    ("deepseek_r1", "<thinker>not a marker</think>ok", "<thinker>not a marker", "ok"),
    ("deepseek_r1", "<thi", "<thi", ""),
    ("mistral", "[THINK]weighing[/THINK]\nFinal.", "weighing", "Final."),
    ("mistral", "Plain [THIN answer", "", "Plain [THIN answer"),
]


@pytest.mark.parametrize(("name", "text", "reasoning", "content"), CASES)
def test_whole_text(name: str, text: str, reasoning: str, content: str) -> None:
    assert _run(reasoning_parser(name), [text]) == (reasoning, content)


@pytest.mark.parametrize(("name", "text", "reasoning", "content"), CASES)
def test_one_character_at_a_time_matches_whole(name: str, text: str, reasoning: str, content: str) -> None:
    assert _run(reasoning_parser(name), list(text)) == (reasoning, content)


@pytest.mark.parametrize(("name", "text", "reasoning", "content"), CASES)
def test_split_at_every_position(name: str, text: str, reasoning: str, content: str) -> None:
    for cut in range(len(text) + 1):
        assert _run(reasoning_parser(name), [text[:cut], text[cut:]]) == (reasoning, content), cut


def test_markers_split_across_feeds_stream_as_soon_as_decided() -> None:
    parser = reasoning_parser("qwen")
    assert parser.feed("<thi") == ("", "")
    assert parser.feed("nk>hel") == ("hel", "")
    assert parser.feed("lo</th") == ("lo", "")
    assert parser.feed("ink>\n\nAnswer") == ("", "Answer")
    assert parser.flush() == ("", "")


def test_only_a_possible_marker_start_is_held_back() -> None:
    parser = reasoning_parser("basic")
    assert parser.feed("hello") == ("", "hello")
    assert parser.feed(" world <") == ("", " world ")
    assert parser.feed("b>") == ("", "<b>")
    parser = reasoning_parser("basic")
    parser.feed("<think>")
    assert parser.feed("thinking </") == ("thinking ", "")
    assert parser.feed("p>") == ("</p>", "")


def test_blank_lines_after_the_end_marker_are_dropped_across_feeds() -> None:
    parser = reasoning_parser("qwen")
    assert parser.feed("<think>x") == ("x", "")
    assert parser.feed("</think>") == ("", "")
    assert parser.feed("\n") == ("", "")
    assert parser.feed(" \n") == ("", "")
    assert parser.feed("Hi\n\nthere") == ("", "Hi\n\nthere")
    assert parser.feed("\n") == ("", "\n")


def test_deepseek_r1_starts_in_reasoning() -> None:
    parser = reasoning_parser("deepseek_r1")
    assert parser.feed("Let me") == ("Let me", "")
    assert parser.feed(" see</think>") == (" see", "")
    assert parser.feed("Yes.") == ("", "Yes.")


def test_deepseek_r1_holds_only_what_could_be_a_leading_opener() -> None:
    parser = reasoning_parser("deepseek_r1")
    assert parser.feed("\n<thi") == ("", "")
    assert parser.feed("nk>ok") == ("ok", "")
    parser = reasoning_parser("deepseek_r1")
    assert parser.feed("<thought") == ("<thought", "")


def test_mistral_markers_split() -> None:
    parser = reasoning_parser("mistral")
    assert parser.feed("[TH") == ("", "")
    assert parser.feed("INK]a[/") == ("a", "")
    assert parser.feed("THINK]b") == ("", "b")


def test_aliases_behave_like_their_dynamo_names() -> None:
    text = "<think>r</think>\nc"
    assert _run(reasoning_parser("qwen3"), [text]) == _run(reasoning_parser("qwen"), [text])
    assert _run(reasoning_parser("deepseek-r1"), [text]) == _run(reasoning_parser("deepseek_r1"), [text])


def test_names() -> None:
    for name in ("basic", "qwen", "qwen3", "deepseek_r1", "deepseek-r1", "mistral"):
        assert name in REASONING_PARSER_NAMES
        assert isinstance(reasoning_parser(name), ReasoningParser)


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError) as err:
        reasoning_parser("nope")
    assert "nope" in str(err.value)
    for name in REASONING_PARSER_NAMES:
        assert name in str(err.value)


def test_each_parser_is_its_own_sequence() -> None:
    first = reasoning_parser("qwen")
    second = reasoning_parser("qwen")
    first.feed("<think>a")
    assert second.feed("b") == ("", "b")


_PIECES = st.sampled_from(["<think>", "</think>", "<", "</", "think", ">", "\n", " ", "a", "b c", "é"])


@settings(max_examples=150, deadline=None)
@given(
    name=st.sampled_from(REASONING_PARSER_NAMES),
    parts=st.lists(_PIECES, max_size=12),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=6),
)
def test_any_split_gives_the_same_result(name: str, parts: list[str], cuts: list[int]) -> None:
    text = "".join(parts)
    bounds = sorted({min(c, len(text)) for c in cuts})
    pieces = [text[a:b] for a, b in zip([0, *bounds], [*bounds, len(text)], strict=True)]
    whole = _run(reasoning_parser(name), [text])
    assert _run(reasoning_parser(name), pieces) == whole
    reasoning, content = whole
    # Nothing is invented: every shown character came from the output, in order.
    assert len(reasoning) + len(content) <= len(text)
