"""The monitor's sampling: forks tracked for exit I/O, the I/O window, the 0.5 s cap."""

from __future__ import annotations

import struct
from collections import deque
from pathlib import Path

import pytest

from coi.monitor import execwatch
from coi.monitor.collect import Collector, Proc, Sweep
from coi.monitor.monitor import (
    IO_RATE_SPAN,
    IO_WINDOW,
    MAX_INTERVAL,
    Monitor,
    Settings,
    threats_of,
)


def _msg(what: int, payload: bytes) -> bytes:
    body = execwatch._CNMSG.pack(1, 1, 0, 0, 0, 0) + execwatch._EVENT.pack(what, 0, 0) + payload
    return execwatch._NLMSG.pack(execwatch._NLMSG.size + len(body), 3, 0, 0, 0) + body


def test_fork_and_exec_events_are_parsed_and_thread_creation_is_not_a_fork() -> None:
    data = (
        _msg(execwatch.PROC_EVENT_FORK, struct.pack("=IIII", 10, 10, 11, 11))
        + _msg(execwatch.PROC_EVENT_FORK, struct.pack("=IIII", 10, 10, 12, 10))  # a thread
        + _msg(execwatch.PROC_EVENT_EXEC, struct.pack("=II", 11, 11))
    )
    assert execwatch.parse_events(data) == [
        (execwatch.PROC_EVENT_FORK, 11, 10),
        (execwatch.PROC_EVENT_EXEC, 11, 0),
    ]
    assert execwatch.parse_exec(data) == [11]


def test_a_subshell_that_never_execs_has_its_reads_counted_when_it_exits(tmp_path: Path) -> None:
    col = Collector(tmp_path, 1, files=False)
    col.note_exec(Proc(pid=100, nspid=5, ppid=1, uid=0, cmdline="sh", start=1))
    col.note_fork(100, 101)  # `( read loop )`: forked, never execs
    col.note_fork(999, 102)  # another container's (or the host's) fork
    col.note_exit(101, 300_000_000, 0)
    col.note_exit(102, 500_000_000, 0)
    sweep = col.sweep()
    assert sweep.read_bytes == 300_000_000


def _sweep(read: int, interval: float) -> Sweep:
    return Sweep(0.0, [], [], [], [], read, 0, interval, True)


def _burst(mon: Monitor, read: int, interval: float) -> list[str]:
    """What one sweep raises about I/O, as the monitor judges it (over its window)."""
    sweep = _sweep(read, interval)
    found = threats_of(sweep, Settings(enabled=True), mon._io_window(sweep))
    if found:
        mon._io.clear()
    return [t.title for t in found]


def test_reads_are_judged_over_a_sliding_window_not_one_half_second() -> None:
    mon = Monitor.__new__(Monitor)
    mon._io = deque()
    # A build's 60 MB burst in half a second: 60 MB/s over the rate's one second, nothing.
    assert _burst(mon, 60_000_000, 0.5) == []
    assert _burst(mon, 0, 0.5) == []
    # A steady 110 MB/s: raised once the window says so, not before.
    mon._io.clear()
    assert _burst(mon, 55_000_000, 0.5) == []
    assert _burst(mon, 55_000_000, 0.5) == ["Large read burst"]
    # Emptied after it raised: the same burst is not reported twice.
    assert mon._io_window(_sweep(0, 0.5)) == (0, 0, IO_RATE_SPAN)
    # The window forgets what is older than IO_WINDOW seconds.
    for _ in range(10):
        _burst(mon, 40_000_000, 0.5)
    assert sum(h[0] for h in mon._io) <= IO_WINDOW + 0.5
    # The last look: 300 MB in 0.3 s is raised.
    mon._io.clear()
    assert _burst(mon, 300_000_000, 0.3) == ["Large read burst"]


def test_the_monitor_looks_at_least_every_half_second() -> None:
    assert Settings().interval <= MAX_INTERVAL == 0.5


def test_connection_tables_are_read_when_a_socket_appears_else_every_two_seconds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from coi.monitor import collect

    reads: list[int] = []
    monkeypatch.setattr(collect, "read_connections", lambda pid: reads.append(pid) or [])
    held: list[str] = ["/dev/null"]
    proc = Proc(pid=7, nspid=1, ppid=0, uid=0, cmdline="init", start=1)
    monkeypatch.setattr(collect, "cgroup_pids", lambda _d: [7])

    def read_proc(pid: int, *, files: bool = False) -> Proc:
        p = Proc(pid=proc.pid, nspid=1, ppid=0, uid=0, cmdline="init", start=1)
        p.files.extend(held)
        return p

    monkeypatch.setattr(collect, "read_proc", read_proc)
    now = [100.0]
    monkeypatch.setattr(collect.time, "monotonic", lambda: now[0])
    col = Collector(tmp_path, 1)
    col.sweep()
    assert len(reads) == 1
    now[0] += 0.5
    col.sweep()
    assert len(reads) == 1  # nothing new held: the last table stands
    held.append("socket:[42]")
    now[0] += 0.5
    col.sweep()
    assert len(reads) == 2  # a new socket: read at once
    now[0] += 0.5
    col.sweep(fresh=True)
    assert len(reads) == 3  # an exec born with a socket on stdio asks for it
    now[0] += collect.CONN_REFRESH
    col.sweep()
    assert len(reads) == 4  # and every CONN_REFRESH seconds anyway


def test_a_last_look_moments_after_a_sweep_is_no_fork_bomb() -> None:
    """24 short commands the exec watcher saw, in a sweep 0.04 s after the previous one: 24
    in a second at most, not 600 a second."""
    procs = [Proc(pid=i, nspid=i, ppid=1, uid=0, cmdline="nslookup x", start=i) for i in range(24)]
    sweep = Sweep(0.0, procs[:2], procs, [], [], 0, 0, 0.04, True)
    assert [t for t in threats_of(sweep, Settings(enabled=True)) if "Fork" in t.title] == []


def test_the_event_filter_is_asked_of_kernels_that_have_it() -> None:
    assert execwatch.filters_events("6.18.44-fc-v1272")
    assert execwatch.filters_events("6.6.0")
    assert not execwatch.filters_events("6.5.13")
    assert not execwatch.filters_events("5.15.0-91-generic")
    assert not execwatch.filters_events("odd")


def test_bytes_through_a_pipe_between_the_containers_processes_count_once() -> None:
    from coi.monitor.collect import through_pipes

    mb = 1_000_000
    # tar -c | gzip: tar reads 30 MB of files and writes them into the pipe; gzip reads
    # them from it and writes 1 MB. rchar says 60 MB read, wchar 31 MB written.
    tar = (30 * mb, 30 * mb, set(), {"pipe:[1]"})
    gzip = (30 * mb, 1 * mb, {"pipe:[1]"}, set())
    assert through_pipes([tar, gzip]) == 30 * mb
    # gunzip | tar -x: the same the other way.
    assert through_pipes([(1 * mb, 30 * mb, set(), {"pipe:[2]"}), (30 * mb, 30 * mb,
                          {"pipe:[2]"}, set())]) == 30 * mb  # fmt: skip
    # dd if=/dev/zero of=/dev/null with coi run's output pipe (its reader is not in the
    # container): nothing went between two of its processes.
    dd = (300 * mb, 300 * mb, set(), {"pipe:[3]"})
    assert through_pipes([dd]) == 0
    # A pipe is counted no more than its lesser side, and no more than was read or written.
    assert through_pipes([(0, 5 * mb, set(), {"pipe:[4]"}), (9 * mb, 0, {"pipe:[4]"}, set())]) == (
        5 * mb
    )
    # dd | cat > /dev/null: 300 MB read from /dev/zero still count (300 of the 600).
    cat = (300 * mb, 300 * mb, {"pipe:[5]"}, set())
    assert through_pipes([(300 * mb, 300 * mb, set(), {"pipe:[5]"}), cat]) == 300 * mb


def test_a_pipes_bytes_are_not_read_twice_when_its_processes_exit_between_sweeps(
    tmp_path: Path,
) -> None:
    col = Collector(tmp_path, 1, files=False)
    tar = Proc(pid=200, nspid=5, ppid=1, uid=0, cmdline="tar -cf - tree", start=1)
    gz = Proc(pid=201, nspid=6, ppid=1, uid=0, cmdline="gzip", start=1)
    col.note_exec(tar)
    col.note_exec(gz)
    tar.pipes_w.add("pipe:[7]")  # its fds, read just after the exec event
    gz.pipes_r.add("pipe:[7]")
    col.note_exit(200, 30_000_000, 30_000_000)
    col.note_exit(201, 30_000_000, 1_000_000)
    sweep = col.sweep()
    assert (sweep.read_bytes, sweep.write_bytes) == (30_000_000, 1_000_000)


def test_a_reaped_childs_bytes_are_not_counted_again_in_its_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel adds a reaped child's I/O to its parent's /proc/<pid>/io: `sh -c 'dd ...'`
    read 300 MB once (the dd's exit record), not twice (and its parent's growth)."""
    from coi.monitor import collect

    io = {"r": 1000}

    def shell(pid: int, *, files: bool = False) -> Proc:
        return Proc(pid=pid, nspid=2, ppid=1, uid=0, cmdline="sh -c loop", start=1,
                    io_read=io["r"], io_write=0)  # fmt: skip

    monkeypatch.setattr(collect, "cgroup_pids", lambda _d: [500])
    monkeypatch.setattr(collect, "read_proc", shell)
    col = Collector(tmp_path, 1, files=False)
    col.sweep()  # the baseline
    col.note_fork(500, 501)
    col.note_exit(501, 75_000_000, 75_000_000)  # dd, 75 MB from /dev/zero
    assert col.sweep().read_bytes == 75_000_000  # not reaped yet: its exit record
    io["r"] += 75_000_000 + 20  # reaped: the shell's counters grow by it (and 20 of its own)
    assert col.sweep().read_bytes == 20
    # A grandchild reaped by a child no sweep saw: credited up the line once.
    col.note_fork(500, 502)
    col.note_fork(502, 503)
    col.note_exit(503, 10_000_000, 0)
    col.note_exit(502, 5_000_000, 0)
    io["r"] += 15_000_000
    assert col.sweep().read_bytes == 15_000_000


def test_a_forked_helper_that_never_execs_and_its_parent_count_their_pipe_once(
    tmp_path: Path,
) -> None:
    """busybox `tar -xzf`: tar forks a child that decompresses into a pipe tar reads; the
    child never execs and both end between two sweeps, so no fd of theirs was ever seen."""
    col = Collector(tmp_path, 1, files=False)
    col.note_exec(Proc(pid=300, nspid=5, ppid=1, uid=0, cmdline="tar -xzf t.tgz", start=1))
    col.note_fork(300, 301)
    col.note_exit(301, 300_000, 30_000_000)  # read the archive, wrote the tree into the pipe
    col.note_exit(300, 30_000_000, 30_000_000)  # read the pipe, wrote the files
    sweep = col.sweep()
    # 30 MB through the pipe counted once (the archive's 0.3 MB may be matched with what the
    # parent wrote the other way: an estimate, never more than was counted).
    assert sweep.read_bytes <= 300_000 and sweep.write_bytes >= 29_700_000
    # A child that reads a lot and writes it out of the container is not discounted: its
    # parent read nothing from it.
    col.note_exec(Proc(pid=400, nspid=7, ppid=1, uid=0, cmdline="sh", start=1))
    col.note_fork(400, 401)
    col.note_exit(401, 300_000_000, 300_000_000)
    assert col.sweep().read_bytes == 300_000_000
    # The channels of exited children are dropped after the sweep: a long shell keeps none.
    assert col._links[400] == (set(), set())
