"""The test tree itself: pytest imports test modules by basename (rootdir-relative packages are
not used here), so one name in two folders breaks collection of the whole suite."""

from __future__ import annotations

from collections import Counter

from tests.conftest import ROOT


def test_no_two_test_files_share_a_name() -> None:
    names = Counter(p.name for p in (ROOT / "tests").rglob("test_*.py"))
    assert [n for n, k in names.items() if k > 1] == []
