"""Process storms from the container's own pids cgroup: a fork bomb that never execs a program
is invisible to exec events and too quick for a sweep, but not to the cgroup's counters.

A thread reads `pids.current` and the `max` count of `pids.events` (how often a fork was
refused at the limit) ten times a second: two small files, no process listing. Only when the
count has piled up fast does it list the cgroup's processes, to tell a flood of idle copies
from a build's busy workers.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from coi.monitor.detect import CRITICAL, HIGH, Threat

# Samples per second (two small files each: 10 a second cost no measurable CPU, and a flood
# is seen 0.1 s sooner than at 5), and the growth in one second that no build reaches (`make
# -j` and test runners add tens of processes a second; a fork bomb thousands).
RATE = 10
SURGE = 300


@dataclass(frozen=True)
class Sample:
    at: float  # seconds (monotonic)
    current: int  # processes (tasks) in the cgroup now
    refused: int  # forks refused at pids.max so far (pids.events "max")
    limit: int  # pids.max (0: none)


def read_sample(cgdir: Path, at: float) -> Sample | None:
    try:
        current = int((cgdir / "pids.current").read_text())
        events = (cgdir / "pids.events").read_text().split()
        raw_max = (cgdir / "pids.max").read_text().strip()
    except (OSError, ValueError):
        return None
    refused = int(events[1]) if len(events) >= 2 and events[0] == "max" else 0
    return Sample(at, current, refused, 0 if raw_max == "max" else int(raw_max))


def storm(window: list[Sample], refused_before: int | None = None) -> Threat | None:
    """What the last second of samples says (oldest first), or None. `refused_before`: the
    refusals counted when last looked at (default: the window's first sample's)."""
    if not window:
        return None
    first, last = window[0], window[-1]
    grew = last.current - first.current
    refused = last.refused - (first.refused if refused_before is None else refused_before)
    evidence = {
        "process": {"count": last.current, "grew": grew, "refused": refused, "limit": last.limit}
    }
    if len(window) >= 2 and grew >= SURGE:
        return Threat(
            CRITICAL,
            "process",
            "Fork bomb detected",
            f"{grew} more processes in {last.at - first.at:.1f} s ({last.current} now)",
            evidence,
        )
    if refused > 0:
        return Threat(
            HIGH,
            "process",
            "Process limit reached",
            f"{refused} forks refused at the limit of {last.limit or '?'} processes "
            f"({last.current} now): a fork bomb or a process flood",
            evidence,
        )
    return None


# A flood that stays under the limit: processes that pile up and stay, FLOOD_GROWTH more
# within FLOOD_SECONDS, the count never falling back meanwhile. A build's processes come and
# go (its count falls as often as it rises); a loop of short commands keeps a handful.
FLOOD_SECONDS = 5.0
FLOOD_GROWTH = 100


def _largest_fall(counts: list[int]) -> int:
    """The largest fall from any count to a later one."""
    fall, peak = 0, counts[0]
    for c in counts:
        peak = max(peak, c)
        fall = max(fall, peak - c)
    return fall


def flood(window: list[Sample]) -> Threat | None:
    """What the last FLOOD_SECONDS of samples (oldest first) say about a slow flood."""
    if len(window) < 2 or window[-1].at - window[0].at < FLOOD_SECONDS - 1.5 / RATE:
        return None
    counts = [s.current for s in window]
    low = min(counts)
    last = window[-1]
    grew = last.current - low
    if grew < FLOOD_GROWTH:
        return None
    # A pile-up hardly falls at all.
    if _largest_fall(counts) > max(8, last.current // 10):
        return None
    span = last.at - window[0].at
    return Threat(
        HIGH,
        "process",
        "Process flood",
        f"{grew} more processes in {span:.1f} s, none ending ({last.current} now, limit "
        f"{last.limit or 'none'}): processes piling up",
        {"process": {"count": last.current, "grew": grew, "seconds": round(span, 1),
                     "limit": last.limit}},
    )  # fmt: skip


# A flood that is quicker than FLOOD_SECONDS: CLONES more processes within a second, none
# ending, and at least CLONES of them idle copies of one program under one parent (`sleep 60 &`
# in a loop). A build's workers are busy (they have used CPU time by then), a test runner's
# are a few per core and busy starting; copies that do nothing but exist are there to fill
# the process table. 24: a loop that forks 25 a second (a busy 2-core machine) is seen
# within a second of its start; 32 took 1.3 to 2 s there.
CLONES = 24
# Idle copies piling up this fast are a fork bomb (killed), not a flood (paused): an exec loop
# that forks a few hundred a second, under SURGE on a busy machine, still fills any limit.
BOMB_RATE = 100
# CPU time (clock ticks, 1/100 s) a process may have used and still count as idle.
IDLE_TICKS = 1


@dataclass(frozen=True)
class Member:
    """One process of the cgroup, as /proc/PID/stat says."""

    pid: int
    ppid: int
    comm: str
    ticks: int  # user + system CPU time


def piled_up(window: list[Sample]) -> tuple[int, float]:
    """How many processes the window (about a second, oldest first) added without any falling
    back by more than a few since, and over how many seconds: the longest such run up to
    the last sample, so processes that ended early in the window (the session's own set-up)
    do not hide a pile-up that began after them. (0, 0.0) when the count just went down."""
    best, span = 0, 0.0
    for start in range(len(window) - 1):
        counts = [s.current for s in window[start:]]
        if _largest_fall(counts) > 2:
            continue
        low = min(range(len(counts)), key=counts.__getitem__)
        best, span = counts[-1] - counts[low], window[-1].at - window[start + low].at
        break  # the earliest start that qualifies holds every later one's growth
    return best, span


def clones(members: Iterable[Member], rate: float = 0.0, at_least: int = CLONES) -> Threat | None:
    """A flood of idle copies: `at_least` processes of one program under one parent that
    have used (almost) no CPU. `rate`: processes added a second meanwhile (BOMB_RATE or more
    makes it a fork bomb)."""
    groups = Counter((m.ppid, m.comm) for m in members if m.ticks <= IDLE_TICKS)
    if not groups:
        return None
    (ppid, comm), count = groups.most_common(1)[0]
    if count < at_least:
        return None
    evidence = {
        "process": {"copies": count, "command": comm, "parent_host_pid": ppid, "rate": round(rate)}
    }
    what = f"{count} idle copies of {comm!r} started by one parent (pid {ppid})"
    if rate >= BOMB_RATE:
        return Threat(
            CRITICAL, "process", "Fork bomb detected", f"{what}, {rate:.0f} a second", evidence
        )
    return Threat(
        HIGH, "process", "Process flood", f"{what} within a second: processes piling up", evidence
    )


def read_members(cgdir: Path) -> list[Member]:
    """The processes of the cgroup and the cgroups under it (host pids); those that end while
    they are read are left out."""
    out: list[Member] = []
    for path, _dirs, files in os.walk(cgdir):
        if "cgroup.procs" not in files:
            continue
        try:
            pids = (Path(path) / "cgroup.procs").read_text().split()
        except OSError:
            continue
        for pid in pids:
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            # The command sits in parentheses and may hold anything, spaces and ")" too.
            comm = stat[stat.index("(") + 1 : stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2 :].split()
            # fields[0] is the state; ppid is the 4th field of stat, utime the 14th, stime the
            # 15th (1-based, counting pid and comm).
            out.append(Member(int(pid), int(fields[1]), comm, int(fields[11]) + int(fields[12])))
    return out


class StormWatcher:
    """Calls `on_threat` when the cgroup's counters show a storm (at most once a second)."""

    def __init__(self, cgdir: Path, on_threat: Callable[[Threat], None]) -> None:
        self.cgdir = cgdir
        self.on_threat = on_threat
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._baseline: Sample | None = None

    def start(self) -> None:
        # Read now, before the command starts: what it does first counts, and refusals from
        # before (a reused container) do not.
        self._baseline = read_sample(self.cgdir, time.monotonic())
        self._thread = threading.Thread(target=self._run, name="coi-storms", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)

    def _run(self) -> None:
        window: deque[Sample] = deque(maxlen=RATE + 1)
        longer: deque[Sample] = deque(maxlen=int(RATE * FLOOD_SECONDS) + 1)
        if self._baseline is not None:
            window.append(self._baseline)
        refused = self._baseline.refused if self._baseline is not None else 0
        quiet_until = 0.0
        while not self._stop.wait(1 / RATE):
            now = time.monotonic()
            sample = read_sample(self.cgdir, now)
            if sample is None:
                if not self.cgdir.exists():
                    return  # the container is gone
                continue
            window.append(sample)
            longer.append(sample)
            if now < quiet_until:
                continue
            threat = storm(list(window), refused) or flood(list(longer))
            piled, seconds = piled_up(list(window))
            if threat is None and piled >= CLONES:
                threat = clones(read_members(self.cgdir), piled / max(seconds, 1 / RATE))
            refused = sample.refused
            if threat is not None:
                self.on_threat(threat)
                quiet_until = now + 1.0
                window.clear()
                window.append(sample)
                longer.clear()
                longer.append(sample)
