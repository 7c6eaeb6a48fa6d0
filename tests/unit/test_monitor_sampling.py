"""The monitor's sampling: forks tracked for exit I/O, the I/O window, the 0.5 s cap."""

from __future__ import annotations

import struct
from collections import deque
from pathlib import Path

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
