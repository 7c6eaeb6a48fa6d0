"""The review copy's `cp -a` with its progress line (coi.review.cp)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from coi.errors import CoiError
from coi.review import cp


def test_progress_is_told_bytes_written_then_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cp, "QUIET_FOR", 0.0)
    monkeypatch.setattr(cp, "POLL", 0.001)
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "big.bin").write_bytes(os.urandom(1 << 20) * 48)
    (src / "sub" / "small.txt").write_text("x\n")
    os.symlink("/etc/passwd", src / "link")
    seen: list[tuple[int, int]] = []
    dst = tmp_path / "dst"
    dst.mkdir()
    cp.copy_tree(str(src), str(dst), what="src", progress=lambda d, t: seen.append((d, t)))
    total = (48 << 20) + 2
    assert cp.tree_bytes(str(src)) == total
    assert seen and seen[-1] == (-1, total)
    assert all(0 <= d <= t == total for d, t in seen[:-1])
    assert (dst / "big.bin").read_bytes() == (src / "big.bin").read_bytes()
    assert os.readlink(dst / "link") == "/etc/passwd"  # copied as a link, not followed


def test_a_failed_copy_says_what_and_why(tmp_path: Path) -> None:
    with pytest.raises(CoiError) as err:
        cp.copy_tree(str(tmp_path / "missing"), str(tmp_path), what="the folder")
    assert "could not copy the folder" in err.value.message and err.value.details


def test_no_progress_line_off_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stderr.isatty", lambda: False)
    assert cp.terminal_progress("Copying") is None
