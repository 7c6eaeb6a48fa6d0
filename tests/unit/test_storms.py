"""Process storms from the pids cgroup's counters (pure rules, and reading the files)."""

from __future__ import annotations

from pathlib import Path

from coi.monitor.storms import SURGE, Sample, read_sample, storm


def _window(*points: tuple[float, int, int]) -> list[Sample]:
    return [Sample(at, cur, refused, 500) for at, cur, refused in points]


def test_a_surge_is_a_fork_bomb_and_a_refused_fork_is_a_limit_reached() -> None:
    bomb = storm(_window((0.0, 10, 0), (0.6, 10 + SURGE, 0)))
    assert bomb is not None and (bomb.level, bomb.title) == ("critical", "Fork bomb detected")
    flood = storm(_window((0.0, 499, 0), (0.2, 500, 3)))
    assert flood is not None and (flood.level, flood.title) == ("high", "Process limit reached")
    assert flood.evidence["process"]["refused"] == 3


def test_a_busy_build_is_no_storm() -> None:
    # make -j: tens of processes a second, coming and going, never refused.
    assert storm(_window((0.0, 12, 0), (0.5, 80, 0), (1.0, 40, 0))) is None
    assert storm(_window((0.0, 12, 0))) is None  # one sample says nothing


def test_the_counters_are_read_from_the_cgroup_files(tmp_path: Path) -> None:
    (tmp_path / "pids.current").write_text("42\n")
    (tmp_path / "pids.events").write_text("max 7\n")
    (tmp_path / "pids.max").write_text("max\n")
    assert read_sample(tmp_path, 1.0) == Sample(1.0, 42, 7, 0)
    assert read_sample(tmp_path / "gone", 1.0) is None
