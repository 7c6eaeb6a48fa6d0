"""An exec whose websocket the daemon closes while it is being opened: started again only
when its command cannot have started (the daemon starts it once every websocket is
connected), bounded like the stalled open's retry."""

from __future__ import annotations

import ssl
from typing import Any

import pytest
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosedError, InvalidMessage, InvalidStatus
from websockets.http11 import Response

from coi.backend.exec import _START_ATTEMPTS, ExecAPI, ExecRequest, _closed_before_start
from coi.errors import BackendError

CLOSED = ConnectionClosedError(None, None)  # what websockets raises: request never written
LOST = InvalidMessage("did not receive a valid HTTP response")  # request sent, no answer
REFUSED = InvalidStatus(Response(403, "Forbidden", Headers()))


def test_the_message_seen_is_the_closed_connection() -> None:
    assert str(CLOSED) == "no close frame received or sent"


@pytest.mark.parametrize("index", [0, 1, 2, 3])
def test_closed_before_the_request_was_written_is_retried_on_any_socket(index: int) -> None:
    assert _closed_before_start(CLOSED, index, 4)


def test_lost_after_the_request_is_retried_only_before_the_last_socket() -> None:
    """The daemon may have taken the last socket (then the command starts): not retried."""
    assert _closed_before_start(LOST, 0, 4) and _closed_before_start(LOST, 2, 4)
    assert not _closed_before_start(LOST, 3, 4)
    assert not _closed_before_start(LOST, 0, 1)


@pytest.mark.parametrize(
    "err",
    [REFUSED, ssl.SSLCertVerificationError("pinned certificate mismatch"), OSError("x"),
     TimeoutError(), ValueError("x")],
)  # fmt: skip
def test_an_answer_or_another_failure_is_never_retried(err: BaseException) -> None:
    assert not _closed_before_start(err, 0, 4)


class _Daemon:
    """Stands in for the client: counts the execs posted (each is a new operation)."""

    def __init__(self) -> None:
        self.posted = 0
        self.project = "default"

    def request(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
        self.posted += 1
        fds = {"control": "c", "0": "a", "1": "b", "2": "d"}
        return {"id": f"op{self.posted}", "metadata": {"fds": fds}}


class _Sockets(ExecAPI):
    """The websockets' opening fails as `plan` says: (operation, socket index) -> error."""

    def __init__(self, daemon: _Daemon, plan: dict[tuple[int, int], BaseException]) -> None:
        super().__init__(daemon)  # type: ignore[arg-type]
        self.daemon = daemon
        self.plan = plan
        self.opened = 0

    def _connect_ws(self, op_id: str, secret: str) -> Any:
        index = self.opened
        self.opened += 1
        err = self.plan.get((self.daemon.posted, index))
        if err is not None:
            raise err
        return _Open()


class _Open:
    def __enter__(self) -> _Open:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _start(api: _Sockets) -> BackendError:
    def opened_reset() -> None:
        api.opened = 0

    orig = api.daemon.request

    def request(*a: Any, **kw: Any) -> dict[str, Any]:
        opened_reset()
        return orig(*a, **kw)

    api.daemon.request = request  # type: ignore[method-assign]
    with pytest.raises(BackendError) as info:
        api.start("box", ExecRequest(["true"]))
    return info.value


def test_start_posts_the_exec_again_at_most_the_stall_retrys_limit() -> None:
    plan = {(n, 2): CLOSED for n in range(1, 10)}
    api = _Sockets(_Daemon(), plan)
    err = _start(api)
    assert api.daemon.posted == _START_ATTEMPTS
    assert "websocket connect failed: no close frame received or sent" in err.message


def test_start_does_not_post_again_when_the_command_may_have_started() -> None:
    api = _Sockets(_Daemon(), {(1, 3): LOST})
    _start(api)
    assert api.daemon.posted == 1
    api = _Sockets(_Daemon(), {(1, 0): REFUSED})
    _start(api)
    assert api.daemon.posted == 1


def test_a_retry_after_a_close_meets_the_next_failure_as_it_is() -> None:
    api = _Sockets(_Daemon(), {(1, 0): CLOSED, (2, 1): LOST, (3, 3): LOST})
    err = _start(api)
    assert api.daemon.posted == 3 and "valid HTTP response" in err.message
