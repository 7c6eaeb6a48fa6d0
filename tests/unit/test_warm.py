"""Running spares' pure rules: which sessions use them, what makes two sandboxes the same,
and when a spare's network proof still holds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from coi import labels
from coi.backend.models import Instance
from coi.sessions import warm
from coi.sessions.forwards import PortRequest, Published
from coi.sessions.sandbox import SandboxSpec

CONFIG = {
    "security.nesting": "true",
    "raw.idmap": "both 1000 1000",
    labels.WORKSPACE: "/w",
    labels.KIND: "run",
    labels.OWNER_HOST: "h",
    labels.OWNER_PID: "10",
}
DEVICES = {
    "root": {"type": "disk", "path": "/", "pool": "coi"},
    "eth0": {"type": "nic", "network": "coi-1", "ipv4.address": "10.0.0.5"},
    "workspace": {"type": "disk", "source": "/w", "path": "/workspace"},
}


def _key(config: dict[str, str] = CONFIG, devices: Any = DEVICES, **kw: Any) -> str:
    args = {"fingerprint": "f" * 64, "ephemeral": True, "setup": "", "drop_root": False, **kw}
    return warm.key(config, devices, **args)


def test_the_key_leaves_out_the_address_and_who_made_it() -> None:
    other = {**DEVICES, "eth0": {**DEVICES["eth0"], "ipv4.address": "10.0.0.9"}}
    made_by = {**CONFIG, labels.KIND: "spare", labels.OWNER_PID: "99", labels.SPARE_KEY: "x"}
    assert _key() == _key(devices=other) == _key(config=made_by)


@pytest.mark.parametrize(
    "change",
    [
        {"config": {**CONFIG, "limits.memory": "1GiB"}},
        {"config": {**CONFIG, "raw.idmap": "both 1001 1000"}},  # another owner of the folder
        {"devices": {**DEVICES, "eth0": {**DEVICES["eth0"], "network": "coi-2"}}},  # policy
        {"devices": {**DEVICES, "git-hooks": {"type": "disk", "readonly": "true"}}},
        {"fingerprint": "e" * 64},  # the image was rebuilt
        {"ephemeral": False},  # a shell's, not a run's
        {"setup": "ln -sf /usr/share/zoneinfo/UTC /etc/localtime"},
        {"drop_root": True},
    ],
)
def test_anything_else_makes_another_sandbox(change: dict[str, Any]) -> None:
    assert _key(**change) != _key()


def _spec(**kw: Any) -> SandboxSpec:
    return SandboxSpec(workspace=Path("/w"), image="coi", persistent=False, **kw)


def test_only_plain_sessions_use_them() -> None:
    assert warm.wanted(_spec(running_spares=1))
    assert not warm.wanted(_spec())  # off by default
    for kw in (
        {"persistent": True},
        {"remote": "r"},
        {"review": "abc"},
        {"target": "m1"},
        {"alias": "mine"},
        {"ports": PortRequest(exact=(Published(8080, 80),))},
    ):
        base = {"workspace": Path("/w"), "image": "coi", "persistent": False, "running_spares": 1}
        assert not warm.wanted(SandboxSpec(**{**base, **kw})), kw


def _inst(config: dict[str, str], status: str = "Running") -> Instance:
    return Instance(
        name="coi-abcd1234-1",
        status=status,
        ephemeral=True,
        created_at="",
        config=config,
        devices={},
        expanded_devices={},
        profiles=(),
        description="",
        raw={},
    )


def test_a_proof_holds_on_the_same_daemon_process_and_nic_only() -> None:
    made = _inst({"volatile.eth0.host_name": "veth1", labels.KIND: warm.KIND})
    mark = warm.proof_mark(made, 4242)
    spare = _inst({**made.config, labels.SPARE_PROOF: mark, labels.SPARE_READY: "true"})
    assert warm.is_ready(spare) and warm.proof_holds(spare, 4242)
    assert not warm.proof_holds(spare, 4243)  # the daemon restarted
    restarted = _inst({**spare.config, "volatile.eth0.host_name": "veth2"})
    assert not warm.proof_holds(restarted, 4242)  # a new NIC: the container restarted
    assert not warm.proof_holds(_inst({**spare.config, labels.SPARE_PROOF: ""}), 4242)
    assert not warm.proof_holds(spare, 0)  # a daemon that does not say its pid
    assert not warm.is_ready(_inst(spare.config, status="Stopped"))


def test_a_spare_that_cannot_be_handed_over_is_noted_and_the_session_ends_well(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pickle
    import types

    from coi.backend.connection import Endpoint
    from coi.sessions.sandbox import Sandbox

    monkeypatch.setenv("COI_HOME", str(tmp_path))
    spec = SandboxSpec(
        workspace=tmp_path, image="coi", persistent=False, kind="run", running_spares=1
    )
    # Only what `_boot_spares` reads of a client: where the daemon is.
    client = types.SimpleNamespace(endpoint=Endpoint(socket_path="/x"), project="default")
    box = Sandbox(client, spec, log=lambda _msg: None)  # type: ignore[arg-type]
    box.name = "coi-abcd1234-1"

    def refuse(*_a: Any, **_k: Any) -> None:
        raise pickle.PicklingError("cannot pickle a thing")

    monkeypatch.setattr(pickle, "dump", refuse)
    box._boot_spares()  # no exception: the session itself is done
    assert "cannot pickle a thing" in (tmp_path / "logs" / "spares.log").read_text()
    assert not list((tmp_path / "locks").glob("spare-*.job"))
