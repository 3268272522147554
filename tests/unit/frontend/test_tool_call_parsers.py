from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from armature.frontend.parsers import (
    TOOL_CALL_PARSER_NAMES,
    ParsedToolCall,
    ToolCallParser,
    tool_call_parser,
)

Seen = tuple[str, list[tuple[str, dict[str, object]]]]


def _run(parser: ToolCallParser, pieces: list[str]) -> Seen:
    """What a client sees in total: the content, and each call as (name, arguments object)."""
    content: list[str] = []
    calls: list[ParsedToolCall] = []
    for piece in pieces:
        text, done = parser.feed(piece)
        content.append(text)
        calls += done
    text, done = parser.flush()
    content.append(text)
    calls += done
    out = []
    for call in calls:
        assert call.name
        arguments = json.loads(call.arguments)
        assert isinstance(arguments, dict)
        out.append((call.name, arguments))
    return "".join(content), out


def _hermes(name: str, arguments: object) -> str:
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"


WEATHER = {"city": "Paris", "days": 3}

# (parser, output, expected content, expected calls)
CASES: list[tuple[str, str, str, list[tuple[str, dict[str, object]]]]] = [
    # hermes
    ("hermes", "Just an answer.", "Just an answer.", []),
    ("hermes", _hermes("get_weather", WEATHER), "", [("get_weather", WEATHER)]),
    (
        "hermes",
        "Checking. " + _hermes("get_weather", WEATHER) + "\nand " + _hermes("ping", {}) + " done",
        "Checking. \nand  done",
        [("get_weather", WEATHER), ("ping", {})],
    ),
    ("hermes", _hermes("f", json.dumps({"q": "東京"})), "", [("f", {"q": "東京"})]),
    ("hermes", '<tool_call>{"name": "ping"}</tool_call>', "", [("ping", {})]),
    ("hermes", "a <tool_call>{not json}</tool_call> b", "a <tool_call>{not json}</tool_call> b", []),
    ("hermes", '<tool_call>{"name": "", "arguments": {}}</tool_call>',
     '<tool_call>{"name": "", "arguments": {}}</tool_call>', []),
    ("hermes", '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
     '<tool_call>{"name": "f", "arguments": [1]}</tool_call>', []),
    ("hermes", 'x <tool_call>{"name": "f", "arguments": {', 'x <tool_call>{"name": "f", "arguments": {', []),
    ("hermes", "ends on a partial <tool_ca", "ends on a partial <tool_ca", []),
    # llama3_json
    ("llama3_json", "The weather is fine.", "The weather is fine.", []),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris", "days": 3}}', "",
     [("get_weather", WEATHER)]),
    ("llama3_json", '<|python_tag|>{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}', "",
     [("get_weather", WEATHER)]),
    ("llama3_json", ('\n {"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": 1}}\n'
                     '{"name": "c", "parameters": {}}<|eom_id|>'), "",
     [("a", {}), ("b", {"x": 1}), ("c", {})]),
    ("llama3_json", '{"name": "a", "parameters": {"x": 1}', '{"name": "a", "parameters": {"x": 1}', []),
    ("llama3_json", '{"name": "a", "parameters": {}} and then prose',
     '{"name": "a", "parameters": {}} and then prose', []),
    ("llama3_json", '{"title": "not a call"}', '{"title": "not a call"}', []),
    ("llama3_json", "<|python_tag|>search.call(query='x')", "<|python_tag|>search.call(query='x')", []),
    ("llama3_json", "  <|python", "  <|python", []),
    # mistral
    ("mistral", "No tools needed.", "No tools needed.", []),
    ("mistral", ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}, '
                 '{"name": "ping", "arguments": "{}"}]'), "", [("get_weather", WEATHER), ("ping", {})]),
    ("mistral", 'Sure.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "days": 3}[TOOL_CALLS]ping[ARGS]{}',
     "Sure.", [("get_weather", WEATHER), ("ping", {})]),
    ("mistral", 'Sure.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "days": 3}ping[ARGS]{"n": -1.5}',
     "Sure.", [("get_weather", WEATHER), ("ping", {"n": -1.5})]),
    ("mistral", '[TOOL_CALLS]get_weather[CALL_ID]a1b2c3d4e[ARGS]{"city": "Paris", "days": 3}', "",
     [("get_weather", WEATHER)]),
    ("mistral", "[TOOL_CALLS]bad name[ARGS]{} then text", "[TOOL_CALLS]bad name[ARGS]{} then text", []),
    ("mistral", "[TOOL_CALLS][ARGS]{}", "[TOOL_CALLS][ARGS]{}", []),
    ("mistral", '[TOOL_CALLS] [{"arguments": {}}]', '[TOOL_CALLS] [{"arguments": {}}]', []),
    ("mistral", '[TOOL_CALLS]f[ARGS]{"a": ', '[TOOL_CALLS]f[ARGS]{"a": ', []),
    ("mistral", '[TOOL_CALLS]f[ARGS]{"a": 1} trailing words', " trailing words",
     [("f", {"a": 1})]),
    ("mistral", "text then [TOOL_CA", "text then [TOOL_CA", []),
    ("mistral", "[TOOL_CALLS]f[ARGS]5", "[TOOL_CALLS]f[ARGS]5", []),
    ("mistral", "[TOOL_CALLS]f[ARGS]null", "[TOOL_CALLS]f[ARGS]null", []),
    ("mistral", '[TOOL_CALLS]f[ARGS]"{\\"a\\": 1}"', "", [("f", {"a": 1})]),
    # pythonic
    ("pythonic", "Plain answer [with brackets].", "Plain answer [with brackets].", []),
    ("pythonic", '[get_weather(city="Paris", days=3), ping()]', "", [("get_weather", WEATHER), ("ping", {})]),
    ("pythonic", '<|python_start|>[get_weather(city="Paris", days=3)]<|python_end|>', "",
     [("get_weather", WEATHER)]),
    ("pythonic", "\n[f(a=-2, b=+1.5, c=True, d=None, e=[1, 'x'], g={'k': {'n': [False]}}, h='東京')]\n", "",
     [("f", {"a": -2, "b": 1.5, "c": True, "d": None, "e": [1, "x"], "g": {"k": {"n": [False]}},
             "h": "東京"})]),
    ("pythonic", "[math.sqrt(x=4)]", "", [("math.sqrt", {"x": 4})]),
    ("pythonic", "[f(a=b)]", "[f(a=b)]", []),
    ("pythonic", "[f(a=g())]", "[f(a=g())]", []),
    ("pythonic", "[f(1)]", "[f(1)]", []),
    ("pythonic", "[f(a=(1, 2))]", "[f(a=(1, 2))]", []),
    ("pythonic", "[f(**{'a': 1})]", "[f(**{'a': 1})]", []),
    ("pythonic", "[f(a=1e999)]", "[f(a=1e999)]", []),
    ("pythonic", "[1, 2, 3]", "[1, 2, 3]", []),
    ("pythonic", "[]", "[]", []),
    ("pythonic", "[f(a=1)] and more", "[f(a=1)] and more", []),
    ("pythonic", "[f(a='unterminated)]", "[f(a='unterminated)]", []),
    ("pythonic", "[f(path='C:\\dir')]", "", [("f", {"path": "C:\\dir"})]),
]

IDS = [f"{i}-{case[0]}" for i, case in enumerate(CASES)]


@pytest.mark.parametrize(("name", "text", "content", "calls"), CASES, ids=IDS)
def test_whole_text(name: str, text: str, content: str, calls: list[tuple[str, dict[str, object]]]) -> None:
    assert _run(tool_call_parser(name), [text]) == (content, calls)


@pytest.mark.parametrize(("name", "text", "content", "calls"), CASES, ids=IDS)
def test_one_character_at_a_time_matches_whole(
    name: str, text: str, content: str, calls: list[tuple[str, dict[str, object]]]
) -> None:
    assert _run(tool_call_parser(name), list(text)) == (content, calls)


@pytest.mark.parametrize(("name", "text", "content", "calls"), CASES, ids=IDS)
def test_split_at_every_position(
    name: str, text: str, content: str, calls: list[tuple[str, dict[str, object]]]
) -> None:
    for cut in range(len(text) + 1):
        assert _run(tool_call_parser(name), [text[:cut], text[cut:]]) == (content, calls), cut


def test_hermes_streams_content_and_holds_only_markup() -> None:
    parser = tool_call_parser("hermes")
    assert parser.feed("Let me check <tool") == ("Let me check ", [])
    assert parser.feed('_call>{"name": "get_weather", ') == ("", [])
    text, calls = parser.feed('"arguments": {"city": "Paris"}}</tool_call>\nOK')
    assert text == "\nOK"
    assert calls == [ParsedToolCall("get_weather", '{"city": "Paris"}')]
    assert parser.flush() == ("", [])


def test_hermes_text_that_is_not_a_marker_is_released_at_once() -> None:
    parser = tool_call_parser("hermes")
    assert parser.feed("1 <") == ("1 ", [])
    assert parser.feed(" 2") == ("< 2", [])
    assert parser.feed("<tool_cell>") == ("<tool_cell>", [])


def test_hermes_unfinished_block_is_never_shown_before_flush() -> None:
    parser = tool_call_parser("hermes")
    assert parser.feed('<tool_call>{"name": "f"') == ("", [])
    assert parser.feed(", ") == ("", [])
    assert parser.flush() == ('<tool_call>{"name": "f", ', [])


def test_hermes_arguments_keep_non_ascii_text() -> None:
    parser = tool_call_parser("hermes")
    _, calls = parser.feed(_hermes("f", {"city": "Zürich"}))
    assert calls[0].arguments == '{"city": "Zürich"}'


def test_llama3_json_is_decided_at_flush() -> None:
    parser = tool_call_parser("llama3_json")
    assert parser.feed('{"name": "a", ') == ("", [])
    assert parser.feed('"parameters": {"x": 1}}') == ("", [])
    assert parser.flush() == ("", [ParsedToolCall("a", '{"x": 1}')])


def test_llama3_json_plain_output_streams() -> None:
    parser = tool_call_parser("llama3_json")
    assert parser.feed("  ") == ("", [])  # blank so far: could still open a call
    assert parser.feed("Hel") == ("  Hel", [])
    assert parser.feed("lo {") == ("lo {", [])
    assert parser.flush() == ("", [])


def test_llama3_json_python_tag_split() -> None:
    parser = tool_call_parser("llama3_json")
    assert parser.feed("<|pyth") == ("", [])
    assert parser.feed('on_tag|>{"name": "a", "parameters": {}}') == ("", [])
    assert parser.flush() == ("", [ParsedToolCall("a", "{}")])


def test_mistral_emits_each_call_as_its_json_closes() -> None:
    parser = tool_call_parser("mistral")
    assert parser.feed("Sure. [TOOL_") == ("Sure. ", [])
    assert parser.feed("CALLS]get_weather[AR") == ("", [])
    assert parser.feed('GS]{"city": "Paris"') == ("", [])
    assert parser.feed("}") == ("", [ParsedToolCall("get_weather", '{"city": "Paris"}')])
    assert parser.feed("[TOOL_CALLS]ping[ARGS]{}") == ("", [ParsedToolCall("ping", "{}")])
    assert parser.flush() == ("", [])


def test_mistral_invalid_markup_becomes_content_in_order() -> None:
    parser = tool_call_parser("mistral")
    assert parser.feed("[TOOL_CALLS]not a name[ARGS]{}") == ("[TOOL_CALLS]not a name[ARGS]{}", [])
    assert parser.feed(" more") == (" more", [])


def test_pythonic_is_decided_at_flush_and_plain_output_streams() -> None:
    parser = tool_call_parser("pythonic")
    assert parser.feed("[ping(") == ("", [])
    assert parser.feed(")]") == ("", [])
    assert parser.flush() == ("", [ParsedToolCall("ping", "{}")])
    parser = tool_call_parser("pythonic")
    assert parser.feed("Hi") == ("Hi", [])
    assert parser.feed(" [x]") == (" [x]", [])


def test_needs_special_tokens() -> None:
    expected = {"hermes": False, "llama3_json": True, "mistral": True, "pythonic": False}
    for name, needs in expected.items():
        assert tool_call_parser(name).needs_special_tokens is needs


def test_names() -> None:
    assert set(TOOL_CALL_PARSER_NAMES) == {"hermes", "llama3_json", "mistral", "pythonic"}


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError) as err:
        tool_call_parser("nope")
    assert "nope" in str(err.value)
    for name in TOOL_CALL_PARSER_NAMES:
        assert name in str(err.value)


def test_deeply_nested_json_does_not_raise() -> None:
    deep = "[" * 100_000
    for name, text in [
        ("hermes", f'<tool_call>{{"name": "f", "arguments": {deep}</tool_call>'),
        ("llama3_json", f'{{"name": "f", "parameters": {deep}'),
        ("mistral", f"[TOOL_CALLS]f[ARGS]{{\"a\": {deep}"),
        ("pythonic", f"[f(a={deep})]"),
    ]:
        assert _run(tool_call_parser(name), [text]) == (text, [])


_PIECES = st.sampled_from([
    "<tool_call>", "</tool_call>", '{"name": "f", "arguments": {"a": 1}}', "[TOOL_CALLS]", "f[ARGS]",
    '{"b": [2]}', "<|python_tag|>", '{"name": "g", "parameters": {}}', ";", "[", "]", "ping()", "<", "\n",
    " ", "text", "{",
])


@settings(max_examples=150, deadline=None)
@given(
    name=st.sampled_from(TOOL_CALL_PARSER_NAMES),
    parts=st.lists(_PIECES, max_size=10),
    cuts=st.lists(st.integers(min_value=0, max_value=300), max_size=6),
)
def test_any_split_gives_the_same_result(name: str, parts: list[str], cuts: list[int]) -> None:
    text = "".join(parts)
    bounds = sorted({min(c, len(text)) for c in cuts})
    pieces = [text[a:b] for a, b in zip([0, *bounds], [*bounds, len(text)], strict=True)]
    whole = _run(tool_call_parser(name), [text])
    assert _run(tool_call_parser(name), pieces) == whole
    content, calls = whole
    if not calls:
        assert content == text  # no call: every character comes back as content
