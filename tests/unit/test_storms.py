"""Process storms from the pids cgroup's counters (pure rules, and reading the files)."""

from __future__ import annotations

from pathlib import Path

import pytest

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


def _samples(counts: list[int], every: float = 0.2) -> list[Sample]:
    return [Sample(i * every, c, 0, 1000) for i, c in enumerate(counts)]


def test_processes_piling_up_under_the_limit_are_a_flood() -> None:
    from coi.monitor.storms import FLOOD_GROWTH, flood

    # `sleep 60 &` thirty times a second: 150 more in five seconds, none ending.
    rising = _samples([5 + 6 * i for i in range(26)])
    t = flood(rising)
    assert t is not None and (t.level, t.title) == ("high", "Process flood")
    assert t.evidence["process"]["grew"] >= FLOOD_GROWTH
    # The same growth in less than the window (a surge is the fork bomb rule's) is not judged.
    assert flood(rising[:10]) is None


def test_builds_and_loops_of_short_commands_are_no_flood() -> None:
    from coi.monitor.storms import flood

    # make -j: up to a hundred and more, and down again as jobs end.
    build = _samples([10, 60, 120, 90, 130, 70, 140, 100, 150, 60, 120, 80, 130, 90, 150, 100,
                      140, 90, 120, 110, 150, 100, 130, 120, 140, 110])  # fmt: skip
    assert flood(build) is None
    # 500 short processes in a row: three or four alive at any time.
    assert flood(_samples([3, 4, 3, 4, 4, 3] * 5)) is None
    # Workers started over a few seconds and then steady: 40, under the growth.
    assert flood(_samples([5 + min(i, 10) * 4 for i in range(26)])) is None


def test_idle_copies_of_one_program_under_one_parent_are_a_flood() -> None:
    from coi.monitor.storms import BOMB_RATE, CLONES, Member, clones, piled_up

    # `sleep 60 &` forty times a second: within a second, CLONES more and none ending.
    assert piled_up(_samples([5, 12, 20, 28, 37, 45])) == (40, pytest.approx(1.0))
    # A build: up and down; only its last rise counts, and it just went down.
    assert piled_up(_samples([5, 40, 20, 45, 30, 50])) == (20, pytest.approx(0.2))
    assert piled_up(_samples([5, 40, 20, 45, 30, 25])) == (0, 0.0)
    # The session's set-up ending early in the window does not hide a pile-up after it.
    assert piled_up(_samples([30, 9, 17, 26, 34, 43], every=0.1)) == (34, pytest.approx(0.4))
    assert piled_up(_samples([9, 9, 10, 9, 10, 9]))[0] == 0  # idle: nothing piles up
    sleepers = [Member(100 + i, 7, "sleep", 0) for i in range(CLONES)]
    t = clones([*sleepers, Member(7, 1, "sh", 3)], rate=40)
    assert t is not None and (t.level, t.title) == ("high", "Process flood")
    assert t.evidence["process"] == {
        "copies": CLONES,
        "command": "sleep",
        "parent_host_pid": 7,
        "rate": 40,
    }
    # The same copies piling up at a fork bomb's pace (an exec loop under the surge rule).
    bomb = clones(sleepers, rate=BOMB_RATE)
    assert bomb is not None and (bomb.level, bomb.title) == ("critical", "Fork bomb detected")
    assert clones(sleepers[1:]) is None  # one short of the rule


def test_busy_workers_and_mixed_programs_are_no_flood() -> None:
    from coi.monitor.storms import CLONES, Member, clones

    # A test runner's workers: one parent, one program, but busy starting (CPU time used).
    assert clones([Member(100 + i, 7, "python3", 25) for i in range(2 * CLONES)]) is None
    # A browser or a compose stack: many processes, of many programs or parents.
    assert clones([Member(100 + i, 7, f"worker{i % 9}", 0) for i in range(2 * CLONES)]) is None
    assert clones([Member(100 + i, i, "sleep", 0) for i in range(2 * CLONES)]) is None


def test_the_members_are_read_from_the_cgroup_tree(tmp_path: Path) -> None:
    import os

    from coi.monitor.storms import read_members

    (tmp_path / "init.scope").mkdir()
    (tmp_path / "init.scope" / "cgroup.procs").write_text(f"{os.getpid()}\n999999999\n")
    (tmp_path / "cgroup.procs").write_text("")
    (member,) = read_members(tmp_path)  # the pid that does not exist is left out
    assert (member.pid, member.ppid) == (os.getpid(), os.getppid())
    assert member.comm and member.ticks >= 0
