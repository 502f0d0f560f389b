"""Resume tokens (chatd/shard/resume.py), pure: any cursors map round-trips, plain and deflated;
anything chatd did not make is refused with ValueError (the routes' ``bad_cursor``), never
another exception."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatd.ids import MAX_INT64
from chatd.shard import resume

channel = st.one_of(
    st.builds(lambda a, b: f"dm:{min(a, b)}:{max(a, b)}", st.integers(1, 10**18), st.integers(1, 10**18))
    .filter(lambda c: c.split(":")[1] != c.split(":")[2]),
    st.text("0123456789abcdef", min_size=16, max_size=16).map(lambda h: "g:" + h))


@given(st.dictionaries(channel, st.integers(0, MAX_INT64), max_size=300))
def test_any_cursors_round_trip(cursors):
    token = resume.encode(cursors)
    assert token.startswith(("1.", "1z."))
    assert all(c.isalnum() or c in "-_." for c in token)  # URL- and header-safe as it is
    assert resume.decode(token) == cursors


def test_the_documented_example():
    assert resume.encode({"dm:1:2": 41, "g:00ff00ff00ff00ff": 7}) == "1.ZG06MToyPTQxLGc6MDBmZjAwZmYwMGZmMDBmZj03"
    assert resume.decode("1.") == {}


@settings(max_examples=300)
@given(st.text(max_size=200))
def test_anything_else_is_refused_with_value_error(text):
    try:
        resume.decode(text)
    except ValueError:
        pass


@pytest.mark.parametrize("bad", ["", "2.abc", "1.!!!", "1." + base64.urlsafe_b64encode(b"dm:2:1=3").decode(),
                                 "1." + base64.urlsafe_b64encode(b"dm:1:2=-1").decode(),
                                 "1." + base64.urlsafe_b64encode(b"dm:1:2=1,dm:1:2=2").decode(),
                                 "1z." + base64.urlsafe_b64encode(b"not deflate").decode(), "1." + "A" * 20000])
def test_bad_tokens(bad):
    with pytest.raises(ValueError):
        resume.decode(bad)
