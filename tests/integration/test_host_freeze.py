"""The monitor's pause from the host (the cgroup's freezer, before the daemon's own freeze):
the container's processes stop at once, the daemon then shows it frozen, and `coi resume`
lets it go on; a thaw from the host undoes a freeze the daemon was not told of."""

from __future__ import annotations

import time
from pathlib import Path

from tests.conftest import run_coi
from tests.integration.conftest import wait_for

from coi.backend import IncusClient
from coi.backend.exec import ExecRequest
from coi.monitor.collect import cgroup_dir, cgroup_freeze

# Counts ten times a second, in the background (its own session: it outlives the exec).
TICKER = (
    "setsid sh -c 'i=0; while :; do i=$((i+1)); echo $i > /root/tick; sleep 0.1; done' "
    ">/dev/null 2>&1 </dev/null &"
)


def test_a_host_side_freeze_stops_everything_and_coi_resume_undoes_it(
    client: IncusClient, coi_env: dict[str, str], unique: str
) -> None:
    res = run_coi("container", "launch", "coi-tiny", unique, env=coi_env)
    assert res.returncode == 0, res.stderr
    try:
        cgdir = cgroup_dir(client.project, unique)
        assert cgdir is not None
        assert client.exec.capture(unique, ExecRequest(["sh", "-c", TICKER])).exit_code == 0
        # Read from the host through init's root: a frozen container cannot be asked.
        tick = Path(f"/proc/{client.instances.state(unique).pid}/root/root/tick")
        wait_for(lambda: tick.exists() and tick.read_text().strip(), "the ticker", 10)

        def ticking() -> bool:
            before = tick.read_text()
            wait_for(lambda: tick.read_text() != before, "a tick", 5)
            return True

        assert cgroup_freeze(cgdir)
        frozen_at = tick.read_text()
        assert client.instances.get(unique).status == "Running"  # not told yet
        client.instances.freeze(unique)  # what the responder does next: done at once
        assert client.instances.get(unique).status == "Frozen"
        time.sleep(0.5)  # five ticks, were anything running
        assert tick.read_text() == frozen_at
        res = run_coi("resume", unique, env=coi_env)
        assert res.returncode == 0 and f"Resumed container: {unique}" in res.stderr, res.stderr
        assert ticking()

        # Frozen from the host alone (the daemon's freeze failed): thawed from the host.
        assert cgroup_freeze(cgdir)
        frozen_at = tick.read_text()
        assert cgroup_freeze(cgdir, thaw=True)
        assert ticking() and tick.read_text() != frozen_at
        assert client.instances.get(unique).status == "Running"
    finally:
        client.instances.delete(unique, force=True)
