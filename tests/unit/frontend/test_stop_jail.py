from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from armature.frontend.stop_jail import StopStringJail


def _feed(jail: StopStringJail, pieces: list[str]) -> tuple[str, bool]:
    shown = []
    for p in pieces:
        r = jail.push(p)
        shown.append(r.text)
        if r.stopped:
            return "".join(shown), True
    shown.append(jail.flush())
    return "".join(shown), False


def test_stop_string_spanning_pieces_is_withheld_and_cut() -> None:
    jail = StopStringJail(["STOP"])
    assert jail.push("abc S").text == "abc "
    assert jail.push("TO").text == ""  # "STO" could still become STOP
    r = jail.push("Pxyz")
    assert r.stopped and r.text == "" and r.matched == "STOP"


def test_partial_match_that_fails_is_released() -> None:
    jail = StopStringJail(["STOP"])
    assert jail.push("ST").text == ""
    r = jail.push("AR")
    assert not r.stopped and r.text == "STAR"


def test_the_stop_completed_first_wins_however_the_text_is_split() -> None:
    # "POO" starts first but "O" is complete first: a stream split as "PO" + "O" must stop at
    # "O", so the whole text in one piece does too.
    for pieces in (["PO", "O"], ["POO"]):
        shown, stopped = _feed(StopStringJail(["POO", "O"]), pieces)
        assert stopped and shown == "P"


def test_earliest_match_wins_over_list_order() -> None:
    jail = StopStringJail(["world", "lo w"])
    r = jail.push("hello world")
    assert r.stopped and r.text == "hel" and r.matched == "lo w"


def test_flush_releases_a_held_prefix_at_end_of_sequence() -> None:
    jail = StopStringJail(["</end>"])
    assert jail.push("done </e").text == "done "
    assert jail.flush() == "</e"


def test_no_stops_passes_everything_through() -> None:
    jail = StopStringJail([])
    assert not jail.active
    assert jail.push("anything").text == "anything"


@given(
    text=st.text(alphabet="abS TOP", max_size=40),
    cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=8),
    stops=st.lists(st.text(alphabet="abS TOP", min_size=1, max_size=4), min_size=1, max_size=3),
)
def test_streamed_result_equals_whole_text_result(text: str, cuts: list[int], stops: list[str]) -> None:
    # However the text is split into pieces, the client sees the text up to the stop string
    # completed first (of two ending together, the one starting earlier).
    bounds = sorted({0, len(text), *[c for c in cuts if c <= len(text)]})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    found = [(i + len(s), i) for s in stops if (i := text.find(s)) != -1]
    expected = text[: min(found)[1]] if found else text
    shown, stopped = _feed(StopStringJail(stops), pieces)
    assert stopped == bool(found)
    assert shown == expected
