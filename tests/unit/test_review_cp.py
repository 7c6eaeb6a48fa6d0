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


def test_meter_shows_after_half_a_second_then_clears(monkeypatch: pytest.MonkeyPatch) -> None:
    shown: list[tuple[int, int]] = []
    monkeypatch.setattr(cp, "terminal_progress", lambda label: lambda d, t: shown.append((d, t)))
    clock = iter([0.0, 0.1, 0.7, 0.75, 1.2])
    monkeypatch.setattr(cp.time, "monotonic", lambda: next(clock))
    meter = cp.Meter("Uploading", 100)  # starts at 0.0
    meter(10)  # 0.1: too soon
    meter(50)  # 0.7: shown
    meter(60)  # 0.75: within POLL of the last
    meter(120)  # 1.2: shown; more than announced: the total follows
    meter.done()
    assert shown == [(50, 100), (120, 120), (-1, 100)]


def test_an_upload_tells_its_progress_chunk_by_chunk() -> None:
    import io

    from coi.backend.files import _CHUNK, _chunks

    seen: list[int] = []
    data = b"x" * (_CHUNK * 2 + 5)
    assert b"".join(_chunks(io.BytesIO(data), seen.append)) == data
    assert seen == [_CHUNK, 2 * _CHUNK, 2 * _CHUNK + 5]
