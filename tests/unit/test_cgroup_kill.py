"""The host-side kill's fallback for kernels without `cgroup.kill`: freeze, kill, thaw."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from coi.monitor.collect import cgroup_freeze, cgroup_kill


def _v1_tree(tmp_path: Path, name: str, pids: list[int]) -> tuple[Path, Path]:
    """A hybrid host's v1 layout: pids/NAME (the monitor's cgdir) and freezer/NAME. The
    kernel's freezer.state reads back what was written once the freeze is done, as a
    regular file does at once."""
    cgdir = tmp_path / "pids" / name
    cgdir.mkdir(parents=True)
    freezer = tmp_path / "freezer" / name
    sub = freezer / "init.scope"  # systemd inside makes sub-cgroups
    sub.mkdir(parents=True)
    (freezer / "freezer.state").write_text("THAWED\n")
    (freezer / "cgroup.procs").write_text("")
    (sub / "cgroup.procs").write_text("".join(f"{p}\n" for p in pids))
    return cgdir, freezer


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    """A process of the test's own, standing in for one of the container's."""
    proc = subprocess.Popen(["sleep", "30"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_without_cgroup_kill_every_process_is_killed_between_freeze_and_thaw(
    tmp_path: Path, child: subprocess.Popen[bytes]
) -> None:
    cgdir, freezer = _v1_tree(tmp_path, "lxc.payload.coi-unit-kill-fallback", [child.pid])
    assert cgroup_kill(cgdir)
    assert child.wait(timeout=5) == -9
    # Thawed again: the daemon must find it as it left it (its stop then finds nothing).
    assert (freezer / "freezer.state").read_text().strip() == "THAWED"


def test_without_any_freezer_the_daemon_is_asked(tmp_path: Path) -> None:
    cgdir = tmp_path / "pids" / "lxc.payload.coi-unit-no-freezer"
    cgdir.mkdir(parents=True)
    assert not cgroup_kill(cgdir)
    assert not cgroup_freeze(cgdir)


def test_a_freeze_that_cannot_be_written_kills_nothing(
    tmp_path: Path, child: subprocess.Popen[bytes]
) -> None:
    cgdir, freezer = _v1_tree(tmp_path, "lxc.payload.coi-unit-stuck", [child.pid])
    state = freezer / "freezer.state"
    state.unlink()
    state.symlink_to("/proc/version")  # a file whose write fails, as for a monitor not root
    assert not cgroup_kill(cgdir)
    assert child.poll() is None
