"""Fixtures of the attack suite: the test's network, a runner, and the outcomes of the selected
cases, run two at a time once (each test then checks its own).

Module-scoped, not session-scoped: netkit's addresses are fixed, so the namespace must be gone
before tests/integration makes its own in the same run."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from coi.backend import IncusClient
from tests.attacks import harness
from tests.attacks import net as attacknet
from tests.attacks.corpus import Entry


@pytest.fixture(scope="module")
def attack_net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[attacknet.Net]:
    net = attacknet.create(tmp_path_factory.mktemp("attack-net"))
    try:
        yield net
    finally:
        attacknet.destroy(net)


@pytest.fixture(scope="module")
def runner(
    test_project: str, attack_net: attacknet.Net, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[harness.Runner]:
    tmp = tmp_path_factory.mktemp("attacks")
    env = {k: v for k, v in os.environ.items() if not k.startswith("COI_")}
    env.update(COI_PROJECT=test_project, XDG_CONFIG_HOME=str(tmp / "xdg"))
    image = os.environ.get("COI_ATTACK_IMAGE", "coi-tiny")
    have = harness.probe(image, {**env, "COI_HOME": str(tmp / "probe-home")}, tmp / "probe")
    mounts, missing = harness.host_extras() if image == "coi-tiny" else ({}, {})
    with IncusClient.connect(project=test_project) as client:
        yield harness.Runner(
            client, attack_net, tmp, env, image=image, available=have, mounts=mounts,
            missing=missing,
        )  # fmt: skip


@pytest.fixture(scope="module")
def outcomes(
    request: pytest.FixtureRequest, runner: harness.Runner
) -> dict[tuple[str, str], harness.Outcome]:
    """Every selected case of this module, run once (two sandboxes at a time)."""
    jobs: list[tuple[Entry, str]] = []
    for item in request.session.items:
        spec = getattr(item, "callspec", None)
        here = Path(item.path).parent == Path(__file__).parent
        if here and spec is not None and "case" in spec.params:
            jobs.append(spec.params["case"])
    return runner.run_all(jobs)
