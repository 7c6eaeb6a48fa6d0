"""The Incus/LXD REST client: one HTTP connection, error envelopes, async operations."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import cached_property
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from coi.backend._httpx import httpx
from coi.backend.connection import Endpoint, find_local_socket, pin_mismatch, tls_context
from coi.backend.models import JSON, ServerInfo
from coi.errors import (
    BackendError,
    Conflict,
    DaemonUnreachable,
    IncusTimeout,
    NotFound,
    OperationFailed,
    PermissionDenied,
)

if TYPE_CHECKING:
    from coi.backend.exec import ExecAPI
    from coi.backend.files import FilesAPI
    from coi.backend.images import ImagesAPI
    from coi.backend.instances import InstancesAPI
    from coi.backend.networks import NetworksAPI
    from coi.backend.projects import ProjectsAPI

# Long operations (image import, publish) are waited on in slices of this many seconds so a
# dead daemon cannot hang coi forever, while a slow one is still given the time it needs.
_WAIT_SLICE = 30


@contextmanager
def map_transport_errors(endpoint: Endpoint) -> Iterator[None]:
    """Turn httpx's transport exceptions into coi's backend errors, in one place."""
    try:
        yield
    except httpx.TimeoutException as err:
        raise IncusTimeout(
            f"the daemon at {endpoint.describe()} did not answer in time",
            details=str(err) or type(err).__name__,
            resolution="Check that the daemon is not stuck: 'coi health'.",
        ) from err
    except httpx.ConnectError as err:
        mismatch = pin_mismatch(err, endpoint)
        if mismatch is not None:
            raise mismatch from err
        if isinstance(err.__cause__, PermissionError) or "Permission denied" in str(err):
            raise PermissionDenied(
                f"permission denied on {endpoint.describe()}",
                resolution="Add your user to the daemon's group (incus-admin or lxd), or use root.",
            ) from err
        raise DaemonUnreachable(
            f"cannot connect to the daemon at {endpoint.describe()}",
            details=str(err),
            resolution="Start it with 'coi setup' (or 'systemctl start incus')."
            if endpoint.is_local
            else "Check that the server runs and that this machine reaches its address "
            "('coi remote list'), or use the local daemon: --remote local.",
        ) from err
    except httpx.TransportError as err:
        raise BackendError(
            f"connection to the daemon at {endpoint.describe()} failed",
            details=str(err) or type(err).__name__,
        ) from err


def _accepts(path: str, timeout: float) -> bool:
    """Whether something accepts connections on the unix socket `path`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError:
            return False
    return True


def _error_from_envelope(status: int, message: str, what: str) -> BackendError:
    text = message or f"HTTP {status}"
    lowered = text.lower()
    if status == 404 or "not found" in lowered:
        return NotFound(f"{what}: {text}", status_code=status)
    if status == 409 or "already exists" in lowered:
        return Conflict(f"{what}: {text}", status_code=status)
    if status == 403:
        return PermissionDenied(
            f"{what}: {text}",
            status_code=status,
            resolution="Your client is not trusted by this daemon or project.",
        )
    if NO_SPACE in lowered:
        return OperationFailed(f"{what}: {text}", status_code=status, resolution=SPACE_ADVICE)
    return BackendError(f"{what}: {text}", status_code=status)


# A full disk on the daemon's side (its storage pool, or the folder it keeps its files in):
# the daemon says so in the words of the system call that failed.
NO_SPACE = "no space left on device"
SPACE_ADVICE = (
    "The daemon's storage is full. Free space ('coi clean', old images: 'coi image list', "
    "snapshots: 'coi snapshot list --all'), or grow the pool ('incus storage info POOL'); "
    "then try again."
)


class IncusClient:
    """A typed client for the Incus REST API (`/1.0`), also spoken by LXD.

    Resource groups hang off the client: `client.instances`, `client.images`, `client.files`,
    `client.exec`, `client.networks`, `client.projects`.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        project: str = "default",
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.project = project
        # How long one long poll on an operation lasts (seconds); another follows while it runs.
        self.wait_slice = _WAIT_SLICE
        if transport is None:
            if endpoint.socket_path:
                # No TLS on a unix socket: skip loading the CA bundle (50 ms per command).
                transport = httpx.HTTPTransport(uds=endpoint.socket_path, verify=False)
            else:
                transport = httpx.HTTPTransport(verify=tls_context(endpoint))
        base_url = "http://incus" if endpoint.socket_path else (endpoint.url or "")
        self._http = httpx.Client(transport=transport, base_url=base_url, timeout=timeout)

    @classmethod
    def connect(
        cls,
        *,
        env: Mapping[str, str] | None = None,
        remote: str | None = None,
        project: str = "default",
        timeout: float = 60.0,
    ) -> IncusClient:
        """Connect to the local daemon (or `remote`), Incus preferred over LXD; `timeout`:
        seconds a request may go unanswered."""
        env = os.environ if env is None else env
        if remote and remote != "local":
            from coi.backend.remotes import resolve

            endpoint = resolve(remote, env)
        else:
            endpoint = Endpoint(find_local_socket(env))
        return cls(endpoint, project=project, timeout=timeout)

    def with_project(self, project: str) -> IncusClient:
        """A client on the same connection settings, scoped to another project."""
        return IncusClient(self.endpoint, project=project)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> IncusClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- resource groups ---------------------------------------------------------------

    @cached_property
    def instances(self) -> InstancesAPI:
        from coi.backend.instances import InstancesAPI

        return InstancesAPI(self)

    @cached_property
    def exec(self) -> ExecAPI:
        from coi.backend.exec import ExecAPI

        return ExecAPI(self)

    @cached_property
    def files(self) -> FilesAPI:
        from coi.backend.files import FilesAPI

        return FilesAPI(self)

    @cached_property
    def images(self) -> ImagesAPI:
        from coi.backend.images import ImagesAPI

        return ImagesAPI(self)

    @cached_property
    def networks(self) -> NetworksAPI:
        from coi.backend.networks import NetworksAPI

        return NetworksAPI(self)

    @cached_property
    def projects(self) -> ProjectsAPI:
        from coi.backend.projects import ProjectsAPI

        return ProjectsAPI(self)

    # -- server ------------------------------------------------------------------------

    @cached_property
    def server(self) -> ServerInfo:
        """Server kind, version and API extensions (fetched once per client)."""
        return ServerInfo.from_api(self.get("/1.0"))

    def answers(self, timeout: float = 3.0) -> bool:
        """Whether the daemon answers now (a GET of /1.0, bounded)."""
        return self.now_serving(timeout) is not None

    def now_serving(self, timeout: float = 3.0) -> ServerInfo | None:
        """The daemon as it answers now (None: it does not), read afresh: its `pid` against
        `server.pid` tells whether it restarted since this client first asked."""
        if self.endpoint.socket_path and not _accepts(self.endpoint.socket_path, timeout):
            # Asked of the socket itself first: a refused connect through httpx leaves its
            # socket for the garbage collector to close (a ResourceWarning per look).
            return None
        try:
            with map_transport_errors(self.endpoint):
                resp = self._http.get("/1.0", timeout=timeout)
            if resp.status_code >= 500:
                return None
            return ServerInfo.from_api(resp.json().get("metadata") or {})
        except (BackendError, ValueError):
            return None

    def has_extension(self, name: str) -> bool:
        return self.server.has(name)

    def cluster_members(self) -> list[str]:
        """The names of the cluster's members ([] when the daemon is not in a cluster)."""
        if not self.server.clustered:
            return []
        urls = self.get("/1.0/cluster/members") or ()
        return [unquote(str(u).split("?", 1)[0].rsplit("/", 1)[-1]) for u in urls]

    @property
    def header_prefix(self) -> str:
        """`X-Incus-` on Incus, `X-LXD-` on LXD (file API headers)."""
        return "X-Incus-" if self.server.kind == "incus" else "X-LXD-"

    # -- HTTP core ---------------------------------------------------------------------

    def _params(self, params: Mapping[str, Any] | None) -> dict[str, Any]:
        out = dict(params or {})
        if self.project != "default":
            out.setdefault("project", self.project)
        return out

    def raw_request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        content: Any = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> httpx.Response:
        """Send one request; raise a typed error for an error envelope. Body not parsed."""
        kwargs: dict[str, Any] = {"params": self._params(params)}
        if json is not None:
            kwargs["json"] = json
        if content is not None:
            kwargs["content"] = content
        if headers:
            kwargs["headers"] = dict(headers)
        if timeout is not None:
            kwargs["timeout"] = timeout
        with map_transport_errors(self.endpoint):
            resp = self._http.request(method, path, **kwargs)
        if resp.status_code >= 400:
            raise self._error(resp, f"{method} {path}")
        return resp

    @contextmanager
    def stream(
        self, path: str, *, params: Mapping[str, Any] | None = None
    ) -> Iterator[httpx.Response]:
        """GET with a streamed body (for large downloads); errors are raised before yielding."""
        with (
            map_transport_errors(self.endpoint),
            self._http.stream("GET", path, params=self._params(params)) as resp,
        ):
            if resp.status_code >= 400:
                resp.read()
                raise self._error(resp, f"GET {path}")
            yield resp

    def _error(self, resp: httpx.Response, what: str) -> BackendError:
        try:
            body = resp.json()
            message = str(body.get("error") or "")
        except ValueError:
            message = resp.text.strip()
        return _error_from_envelope(resp.status_code, message, what)

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        content: Any = None,
        headers: Mapping[str, str] | None = None,
        wait: bool = True,
        timeout: float | None = None,
    ) -> Any:
        """Send a request and return `metadata`; async operations are waited on unless told."""
        resp = self.raw_request(
            method,
            path,
            params=params,
            json=json,
            content=content,
            headers=headers,
            timeout=timeout,
        )
        body: JSON = resp.json()
        if body.get("type") == "error":
            # An error envelope can come with HTTP 200 (see wait_operation); it is an error all
            # the same.
            raise _error_from_envelope(
                int(body.get("error_code") or 500), str(body.get("error") or ""), f"{method} {path}"
            )
        if body.get("type") == "async":
            op = body.get("metadata") or {}
            return self.wait_operation(str(op.get("id")), what=f"{method} {path}") if wait else op
        return body.get("metadata")

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params)

    def wait_operation(
        self,
        op_id: str,
        *,
        what: str = "operation",
        timeout: float = -1,
        failure_ok: bool = False,
    ) -> JSON:
        """Block on `/1.0/operations/<id>/wait` until the operation ends; return it.

        The daemon holds the request open until the operation finishes, so this never polls.
        With `failure_ok` a failed operation is returned (its `metadata` may still say what
        happened, e.g. an exec's exit code) instead of raised.

        :raises OperationFailed: the operation ended in failure (unless `failure_ok`).
        """
        remaining = timeout
        while True:
            most = self.wait_slice
            slice_s = most if remaining < 0 else max(1, min(most, int(remaining)))
            resp = self.raw_request(
                "GET",
                f"/1.0/operations/{op_id}/wait",
                params={"timeout": slice_s},
                timeout=slice_s + 30,
            )
            body: JSON = resp.json()
            if body.get("type") == "error":
                # Incus answers the wait of a failed operation with HTTP 200 and an error
                # envelope holding only the operation's error: the operation itself (with its
                # metadata) is read once more. It stays readable for 5 s after it ends, so
                # waiting again instead, as coi once did, ended in "Operation not found".
                # A wait whose slice ran out while the operation runs on gets the same
                # envelope ("context deadline exceeded"): the record says it still runs.
                op = self._operation(op_id) or {
                    "status": "Failure",
                    "err": str(body.get("error") or "failed"),
                }
            else:
                op = body.get("metadata") or {}
            status = op.get("status")
            if status == "Success":
                return op
            if status in ("Failure", "Cancelled"):
                if failure_ok:
                    return op
                err = str(op.get("err") or status)
                raise _operation_error(err, what)
            if status not in ("Running", "Pending", "Cancelling"):
                raise BackendError(
                    f"{what}: operation {op_id} is in an unexpected state", details=str(body)
                )
            if remaining >= 0:
                remaining -= slice_s
                if remaining <= 0:
                    raise IncusTimeout(f"{what}: operation {op_id} still running after {timeout}s")

    def _operation(self, op_id: str) -> JSON | None:
        """The operation's record while the daemon has it (running or ended), else None."""
        try:
            op = self.raw_request("GET", f"/1.0/operations/{op_id}").json().get("metadata")
        except BackendError:
            return None
        return op if isinstance(op, dict) and op.get("status") else None


def _operation_error(err: str, what: str) -> BackendError:
    lowered = err.lower()
    if "not found" in lowered:
        return NotFound(f"{what}: {err}")
    # Incus reports a name taken by a concurrent create as its database's constraint.
    if "already exists" in lowered or "unique constraint failed" in lowered:
        return Conflict(f"{what}: {err}")
    if NO_SPACE in lowered:
        return OperationFailed(f"{what}: {err}", resolution=SPACE_ADVICE)
    return OperationFailed(f"{what}: {err}")
