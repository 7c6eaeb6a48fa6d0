"""The SDK's pure parts: bounded output."""

from __future__ import annotations

from coi.sdk import _Tail


def test_a_bounded_tail_keeps_the_last_bytes_and_says_it_cut() -> None:
    tail = _Tail(10)
    for i in range(100_000):
        tail.add(str(i % 10).encode())
    assert tail.data() == b"0123456789"
    assert tail.cut
    assert len(tail.buf) == 10  # memory stays bounded


def test_an_unbounded_or_short_output_is_kept_whole() -> None:
    whole, short = _Tail(None), _Tail(100)
    for t in (whole, short):
        t.add(b"abc")
        t.add(b"def")
    assert whole.data() == short.data() == b"abcdef"
    assert not whole.cut and not short.cut
