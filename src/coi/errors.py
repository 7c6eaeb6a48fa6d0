"""The one family of errors coi raises: each carries a message, details and a resolution.

    CoiError                      exit 1 unless a subclass says otherwise
     ├── UsageError               bad input from the user (exit 2)
     ├── ConfigError              a config file or value is wrong (exit 2)
     ├── BackendError             anything the Incus/LXD daemon said or did not say
     │    ├── DaemonUnreachable   no socket, daemon down
     │    │    └── DaemonLost     it went away during a session (exit 75: try again later)
     │    ├── PermissionDenied    socket exists but we may not use it
     │    ├── NotFound            404
     │    ├── Conflict            409 / "already exists"
     │    ├── OperationFailed     an async operation ended in failure
     │    └── IncusTimeout        the daemon did not answer in time
     ├── SetupError               `coi setup` could not finish a step
     └── SessionError             a sandbox session could not be set up or run

The CLI turns these into `Error: <message>` plus details and resolution on stderr, and
into the exit code, in exactly one place (`coi.cli.main`).
"""

from __future__ import annotations

from typing import ClassVar


class CoiError(Exception):
    """Base of every error coi reports to a user."""

    exit_code: ClassVar[int] = 1

    def __init__(
        self,
        message: str,
        *,
        details: str | None = None,
        resolution: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        self.resolution = resolution

    def __str__(self) -> str:
        return self.message


class UsageError(CoiError):
    """The user asked for something malformed or impossible."""

    exit_code: ClassVar[int] = 2


class ConfigError(CoiError):
    """A config file or value is invalid."""

    exit_code: ClassVar[int] = 2


class BackendError(CoiError):
    """The container daemon refused or failed a request."""

    def __init__(
        self,
        message: str,
        *,
        details: str | None = None,
        resolution: str | None = None,
        status_code: int | None = None,
    ) -> None:
        super().__init__(message, details=details, resolution=resolution)
        self.status_code = status_code


class DaemonUnreachable(BackendError):
    """No daemon answers on any known socket or remote address."""


class DaemonLost(DaemonUnreachable):
    """The daemon stopped answering while a session ran (killed, restarted, crashed)."""

    # EX_TEMPFAIL (sysexits.h): nothing the user did wrong; the same command can work later.
    exit_code: ClassVar[int] = 75


class PermissionDenied(BackendError):
    """The daemon's socket exists but this user may not talk to it."""


class NotFound(BackendError):
    """The daemon says the object does not exist."""


class Conflict(BackendError):
    """The object already exists or is in a state that forbids the request."""


class OperationFailed(BackendError):
    """A background operation of the daemon ended in failure."""


class IncusTimeout(BackendError):
    """The daemon did not answer in time."""


class SetupError(CoiError):
    """A step of host set-up failed."""


class SessionError(CoiError):
    """A sandbox session could not be prepared or run."""
