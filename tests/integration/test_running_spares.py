"""Running spares (`sandbox.running_spares`): a booted sandbox waits under its slot's name for
the next session in its workspace, on the real daemon, played as the agent would.

The agent is the adversary across time too: what one session leaves must not reach the
next through the spare, and a spare must give the next session the very sandbox (network
policy, workspace, owner) a fresh one would.
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests import netkit
from tests.conftest import run_coi
from tests.integration.conftest import USER, coi_names, remove_containers, user_dir, wait_for
from tests.integration.test_network import probe

from coi import labels
from coi.backend import IncusClient
from coi.backend.models import Instance
from coi.sessions.naming import workspace_hash

TAKEN = "Taking a booted spare sandbox"


def _makers_ended(ws: Path) -> None:
    """Wait (bounded) until no spare maker of the workspace runs: it outlives its coi."""

    def makers() -> bool:
        out = subprocess.run(["pgrep", "-f", str(ws)], capture_output=True, text=True)
        return bool(out.stdout.split())

    wait_for(lambda: not makers(), "the spare maker to end", timeout=120)


def _done(client: IncusClient, ws: Path) -> None:
    """Remove the workspace's sandboxes once the spare maker the last run left has ended
    (removed before, a spare it makes afterwards would be left behind)."""
    _makers_ended(ws)
    remove_containers(client, ws)


@pytest.fixture
def ws(base: Path, user: pwd.struct_passwd, client: IncusClient) -> Iterator[Path]:
    w = user_dir(base / "ws", user)
    try:
        yield w
    finally:
        _done(client, w)


@pytest.fixture
def senv(uenv: dict[str, str]) -> dict[str, str]:
    return {**uenv, "COI_RUNNING_SPARES": "1"}


def _run(
    env: dict[str, str],
    ws: Path,
    *cmd: str,
    user: str | None = USER,
    flags: tuple[str, ...] = (),
) -> tuple[int, str, str]:
    """`coi run [FLAGS] -- CMD` in `ws`."""
    r = run_coi(
        "run", *flags, "--image", "coi-tiny", "-w", str(ws), "--", *cmd,
        env=env, user=user, timeout=180,
    )  # fmt: skip
    return r.returncode, r.stdout, r.stderr


def _spares(client: IncusClient, ws: Path) -> list[Instance]:
    names = set(coi_names(client, ws))
    return [
        i
        for i in client.instances.list()
        if i.name in names and i.config.get(labels.KIND) == "spare"
    ]


def _ready(client: IncusClient, ws: Path, *, replacing: Instance | None = None) -> Instance:
    """The workspace's one ready spare, once nothing else of it is left (bounded wait);
    `replacing`: a spare that must have gone, replaced by another."""

    def one() -> bool:
        names = coi_names(client, ws)
        spares = _spares(client, ws)
        return (
            len(names) == len(spares) == 1
            and spares[0].config.get(labels.SPARE_READY) == "true"
            and (replacing is None or spares[0].config["volatile.uuid"] != uuid)
        )

    uuid = replacing.config["volatile.uuid"] if replacing else ""
    wait_for(one, "a ready running spare", timeout=90)
    (spare,) = _spares(client, ws)
    return spare


def _first_spare(client: IncusClient, env: dict[str, str], ws: Path) -> Instance:
    """The spare a first `coi run -- true` in `ws` leaves, once ready."""
    code, _, err = _run(env, ws, "true")
    assert code == 0, err
    return _ready(client, ws)


@pytest.mark.lxd
def test_a_run_takes_the_booted_spare_the_last_run_left_and_a_new_one_is_booted(
    client: IncusClient, senv: dict[str, str], ws: Path, user: pwd.struct_passwd
) -> None:
    spare = _first_spare(client, senv, ws)
    assert spare.running and spare.ephemeral  # a `coi run` sandbox, as it would be made
    assert spare.config[labels.WORKSPACE] == str(ws)
    assert spare.devices["workspace"]["source"] == str(ws)
    assert spare.devices["eth0"].get("ipv4.address")  # its own reserved address
    # What the maker was asked to make went through a file of the user's own, read and gone.
    assert not list((Path(senv["COI_HOME"]) / "locks").glob("spare-*.job"))

    code, out, err = _run(senv, ws, "sh", "-c", "id -u; echo made > /workspace/f; hostname; exit 3")
    assert code == 3, err  # the command's own exit code
    assert TAKEN in err and f"Launching container {spare.name} " in err
    uid, host = out.split()
    assert uid == "1000" and host == spare.name  # the agent, in the sandbox the slot names
    st = (ws / "f").stat()
    assert (st.st_uid, st.st_gid) == (user.pw_uid, user.pw_gid)  # the user's file, as ever
    # The taken one is gone with its session; the next spare is a new container.
    _ready(client, ws, replacing=spare)


def test_what_a_session_leaves_does_not_reach_the_next_through_the_spare(
    client: IncusClient, senv: dict[str, str], ws: Path
) -> None:
    """The agent of one session leaves a file, a line in its shell's rc, a process and a
    root-owned cron entry behind; the next session takes the spare and finds none of them:
    the spare is made from the image after that session's sandbox is gone."""
    leave = (
        "echo planted > /tmp/planted; echo 'echo PWNED' >> ~/.bashrc; "
        "sleep 600 </dev/null >/dev/null 2>&1 & "
        "sudo sh -c 'echo planted > /etc/planted' 2>/dev/null; "
        "cat /tmp/planted; grep -c PWNED ~/.bashrc; ps -o comm | grep -cx sleep"
    )
    code, out, err = _run(senv, ws, "sh", "-c", leave)
    assert code == 0 and out.split() == ["planted", "1", "1"], err  # all left behind
    _ready(client, ws)
    look = (
        "ls /tmp/planted /etc/planted 2>&1; cat ~/.bashrc 2>/dev/null | grep -c PWNED; "
        "ps -o comm | grep -cx sleep"
    )
    code, out, err = _run(senv, ws, "sh", "-c", look)
    assert TAKEN in err
    lines = out.splitlines()
    assert all("No such file" in line for line in lines[:2]), out
    assert lines[2:] == ["0", "0"], out


def test_a_spare_for_other_settings_is_not_taken_and_replaced_and_a_stale_proof_is_redone(
    client: IncusClient, senv: dict[str, str], ws: Path
) -> None:
    restricted = _first_spare(client, senv, ws)
    # Another network mode makes another sandbox: the spare is not it. It is left alone
    # while that session starts (another slot), and replaced by a spare for the settings
    # of the session that ended.
    code, _, err = _run(senv, ws, "true", flags=("--network", "open"))
    assert code == 0, err
    assert TAKEN not in err and "other settings" not in err
    assert f"Launching container {restricted.name} " not in err
    opened = _ready(client, ws, replacing=restricted)
    assert opened.config[labels.SPARE_KEY] != restricted.config[labels.SPARE_KEY]
    assert opened.devices["eth0"]["network"] != restricted.devices["eth0"]["network"]
    # A slot asked for by number whose spare is for other settings: that one is removed.
    code, _, err = _run(senv, ws, "true", flags=("--slot", opened.name.rsplit("-", 1)[1]))
    assert code == 0 and "Removing a booted spare made for other settings" in err, err
    # A proof made by another daemon process (one that restarted since), or on another
    # NIC, does not hold: the session proves the network again before the command runs.
    spare = _ready(client, ws)
    client.instances.set_config(spare.name, {labels.SPARE_PROOF: "1 veth-elsewhere"})
    code, _, err = _run(senv, ws, "true")
    assert code == 0 and TAKEN in err, err
    assert "Network policy verified" in err


def test_a_spare_a_session_is_taking_is_never_removed_from_under_it(
    client: IncusClient, senv: dict[str, str], ws: Path
) -> None:
    """The maker that replaces spares made for other settings removes one only under its
    slot's claim: while a session holds that claim (it is taking the spare), it stays."""
    restricted = _first_spare(client, senv, ws)
    slot = restricted.name.rsplit("-", 1)[1]
    claim = Path(senv["COI_HOME"]) / "locks" / f"{workspace_hash(str(ws))}-{slot}.claim"
    claim.write_text(f"{os.getpid()}\n")  # a live process holds the slot: a session taking it
    try:
        code, _, err = _run(senv, ws, "true", flags=("--network", "open"))
        assert code == 0 and TAKEN not in err and restricted.name not in err, err
        _makers_ended(ws)
        kept = client.instances.get(restricted.name)  # kept: its slot is held
        assert kept.config["volatile.uuid"] == restricted.config["volatile.uuid"]
    finally:
        claim.unlink()
    # Released, the next maker replaces it with one for the settings of the last session.
    code, _, err = _run(senv, ws, "true", flags=("--network", "open"))
    assert code == 0 and TAKEN not in err, err
    opened = _ready(client, ws, replacing=restricted)
    assert opened.config[labels.SPARE_KEY] != restricted.config[labels.SPARE_KEY]


def test_the_taken_spare_enforces_the_policy_against_the_agent(
    client: IncusClient,
    topology: netkit.Topology,
    coi_env: dict[str, str],
    tmp_path: Path,
    user: pwd.struct_passwd,
) -> None:
    """The network policy in a taken spare, not proven again when it is taken: the agent
    reaches the internet and neither the LAN nor the metadata service."""
    netkit.check_routes(topology)
    ws = user_dir(tmp_path / "ws", user)
    env = {**coi_env, "COI_RUNNING_SPARES": "1"}
    try:
        code, _, err = _run(env, ws, "true", user=None)
        assert code == 0, err
        _ready(client, ws)
        targets = [f"{a}:8080" for a in (netkit.INTERNET, netkit.LAN, netkit.METADATA)]
        code, out, err = _run(env, ws, "sh", "-c", probe(*targets), user=None)
        assert code == 0 and TAKEN in err, err
        assert "Network policy verified" not in err  # the spare's own proof stood
        assert dict(line.split() for line in out.splitlines()) == {
            targets[0]: "ok",
            targets[1]: "blocked",
            targets[2]: "blocked",
        }
    finally:
        _done(client, ws)


def test_list_attach_and_clean_know_a_spare(
    client: IncusClient, senv: dict[str, str], ws: Path
) -> None:
    spare = _first_spare(client, senv, ws)
    r = run_coi("list", "--format", "json", env=senv, user=USER)
    (entry,) = [c for c in json.loads(r.stdout)["active_containers"] if c["name"] == spare.name]
    assert entry["kind"] == "spare" and entry["status"] == "Running"
    assert "waits for the next session" in run_coi("list", env=senv, user=USER).stdout
    # Nothing to attach to: a spare has no session.
    r = run_coi("attach", env=senv, user=USER)
    assert spare.name not in r.stdout and r.returncode == 0
    # Kept by `coi clean` while spares are on, ...
    r = run_coi("clean", "--force", env=senv, user=USER)
    assert r.returncode == 0 and client.instances.exists(spare.name), r.stdout
    # ... removed when its maker died before it was ready (a half-made spare) ...
    client.instances.set_config(
        spare.name, {labels.SPARE_READY: "", labels.OWNER_PID: str(_dead_pid())}
    )
    r = run_coi("clean", "--force", env=senv, user=USER)
    assert r.returncode == 0 and not client.instances.exists(spare.name), r.stdout
    # ... and every one when they are turned off.
    spare = _first_spare(client, senv, ws)
    r = run_coi("clean", "--force", env={**senv, "COI_RUNNING_SPARES": "0"}, user=USER)
    assert r.returncode == 0 and not client.instances.exists(spare.name), r.stdout


def _dead_pid() -> int:
    """A pid no process has (bounded search downwards from the kernel's limit)."""
    top = int(Path("/proc/sys/kernel/pid_max").read_text())
    for pid in range(top - 1, top - 1000, -1):
        if not os.path.exists(f"/proc/{pid}"):
            return pid
    pytest.fail("no free pid found")
