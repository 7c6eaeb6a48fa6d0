from __future__ import annotations

import pytest

from coi.backend.exec import _NOT_STARTED, _retry_not_started
from coi.errors import OperationFailed


def test_lost_child_is_started_again_only_when_nothing_ran() -> None:
    calls = []

    def flaky() -> int:
        calls.append(1)
        if len(calls) < 3:
            raise OperationFailed(f"exec: {_NOT_STARTED}")
        return 7

    assert _retry_not_started(flaky, may_retry=lambda: True) == 7 and len(calls) == 3
    calls.clear()
    with pytest.raises(OperationFailed):
        _retry_not_started(flaky, may_retry=lambda: False)
    assert len(calls) == 1

    # A user's command (`once`) is started again only when its probe says it never ran.
    calls.clear()
    assert _retry_not_started(flaky, may_retry=lambda: True, started=lambda: False) == 7
    calls.clear()
    with pytest.raises(OperationFailed, match="lost track") as lost:
        _retry_not_started(flaky, may_retry=lambda: True, started=lambda: True)
    assert len(calls) == 1 and _NOT_STARTED in (lost.value.details or "")

    def other() -> int:
        raise OperationFailed("exec: something else")

    with pytest.raises(OperationFailed, match="something else"):
        _retry_not_started(other, may_retry=lambda: True)


def test_a_bridge_change_the_daemon_fails_on_a_vanished_veth_is_asked_again() -> None:
    """Incus fails a network PATCH or DELETE when a container's veth goes away while it lists
    the bridge's interfaces (seen under load); that one error is retried, no other."""
    from coi.backend.networks import _settled
    from coi.errors import BackendError

    vanished = BackendError(
        "PATCH /1.0/networks/x: Failed to delete bridge children interfaces: Failed to run: "
        'ip -d -j link show veth1: exit status 1 (Device "veth1" does not exist.)'
    )
    calls: list[int] = []

    def flaky() -> None:
        calls.append(1)
        if len(calls) < 2:
            raise vanished

    _settled(flaky)
    assert len(calls) == 2

    def other() -> None:
        calls.append(1)
        raise BackendError("PATCH /1.0/networks/x: Invalid option")

    calls.clear()
    with pytest.raises(BackendError, match="Invalid option"):
        _settled(other)
    assert len(calls) == 1

    def always() -> None:
        raise vanished

    with pytest.raises(BackendError, match="children interfaces"):
        _settled(always)
