"""Instances: create, state changes, config and device changes, snapshots, delete."""

from __future__ import annotations

import builtins
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from coi.backend.models import JSON, Instance, InstanceState, Snapshot
from coi.errors import BackendError, NotFound

if TYPE_CHECKING:
    from coi.backend.client import IncusClient


def _path(name: str, *rest: str) -> str:
    return "/".join([f"/1.0/instances/{quote(name, safe='')}", *rest])


_BUSY = "is busy running"
_BUSY_WAIT = 30.0


def _while_busy(action: Callable[[], object]) -> None:
    """Run `action`, again while the daemon says another operation holds the instance.

    A graceful stop that timed out keeps its lock for a moment after it failed; a force
    stop or delete sent in that moment is refused as busy. The wait is bounded.
    """
    deadline = time.monotonic() + _BUSY_WAIT
    while True:
        try:
            action()
            return
        except BackendError as err:
            if _BUSY not in err.message or time.monotonic() > deadline:
                raise
        time.sleep(0.2)


class InstancesAPI:
    """`/1.0/instances` and everything below it."""

    def __init__(self, client: IncusClient) -> None:
        self._c = client

    # -- reading -----------------------------------------------------------------------

    def list(self, *, with_state: bool = False) -> builtins.list[Instance]:
        """All instances of the project; `with_state` embeds runtime state (slower)."""
        data = self._c.get("/1.0/instances", recursion=2 if with_state else 1)
        return [Instance.from_api(d) for d in data or ()]

    def names(self) -> builtins.list[str]:
        urls = self._c.get("/1.0/instances") or []
        return [u.rsplit("/", 1)[-1].split("?", 1)[0] for u in urls]

    def get(self, name: str) -> Instance:
        return Instance.from_api(self._c.get(_path(name)))

    def busy(self) -> set[str]:
        """Names of the instances a running task (create, copy, start, stop, ...; not an
        exec) is working on: renaming one of those mid-copy would break the copy."""
        ops = self._c.get("/1.0/operations", recursion=1) or {}
        names: set[str] = set()
        for op in ops.get("running") or ():
            if op.get("class") != "task":
                continue
            for urls in (op.get("resources") or {}).values():
                for url in urls or ():
                    path = str(url).split("?", 1)[0]
                    if path.startswith("/1.0/instances/") or path.startswith("/1.0/containers/"):
                        names.add(path.split("/")[3])
        return names

    def exists(self, name: str) -> bool:
        try:
            self._c.raw_request("GET", _path(name))
        except NotFound:
            return False
        return True

    def state(self, name: str) -> InstanceState:
        return InstanceState.from_api(self._c.get(_path(name, "state")))

    # -- creating and deleting ---------------------------------------------------------

    def create(
        self,
        name: str,
        *,
        image: str,
        config: Mapping[str, str] | None = None,
        devices: Mapping[str, Mapping[str, str]] | None = None,
        profiles: builtins.list[str] | None = None,
        ephemeral: bool = False,
        start: bool = False,
        description: str = "",
        source: JSON | None = None,
        wait: bool = True,
        target: str = "",
    ) -> str:
        """Create a container from a local image alias or fingerprint (and start it).

        `source` replaces the image source entirely (e.g. a pull from an image server).
        `wait=False` returns once the daemon has taken the operation on, with its id (not
        with `start`: the start would have to wait for the create). `target`: the cluster
        member to make it on ('': where the cluster's scheduler places it).
        """
        if start and not wait:
            raise ValueError("create(start=True) needs wait=True")
        if source is None:
            source = {"type": "image"}
            # A 64-hex string is a fingerprint; anything else is an alias.
            if len(image) == 64 and all(ch in "0123456789abcdef" for ch in image):
                source["fingerprint"] = image
            else:
                source["alias"] = image
        body: JSON = {
            "name": name,
            "type": "container",
            "source": source,
            "config": dict(config or {}),
            "devices": {k: dict(v) for k, v in (devices or {}).items()},
            "ephemeral": ephemeral,
            "description": description,
        }
        if profiles is not None:
            body["profiles"] = profiles
        # Servers with `instance_create_start` create and start in one operation.
        one_shot = start and self._c.has_extension("instance_create_start")
        if one_shot:
            body["start"] = True
        params = {"target": target} if target else None
        op = self._c.request("POST", "/1.0/instances", params=params, json=body, wait=wait)
        if not wait:
            return str(op.get("id") or "") if isinstance(op, dict) else ""
        if start and not one_shot:
            self.start(name)
        return ""

    def delete(self, name: str, *, force: bool = False) -> None:
        """Delete an instance. With `force`: stop it first if it runs, and succeed if it is
        already gone (an ephemeral instance vanishes as it stops)."""
        try:
            if force and self.get(name).active:
                try:
                    _while_busy(lambda: self.stop(name, force=True))
                except NotFound:
                    raise
                except BackendError:
                    # It stopped by itself between the look and the stop (a graceful stop
                    # that timed out still finishes; an init that died): "container is not
                    # running" is then no reason not to delete it.
                    if self.get(name).active:
                        raise
            _while_busy(lambda: self._c.request("DELETE", _path(name)))
        except NotFound:
            if not force:
                raise

    # -- state ---------------------------------------------------------------------------

    def set_state(
        self, name: str, action: str, *, force: bool = False, timeout: int = -1, wait: bool = True
    ) -> str:
        """Change the state. `wait=False` returns once the daemon has taken the operation on,
        with the operation's id (for `client.wait_operation`); otherwise ""."""
        body: JSON = {"action": action, "force": force, "timeout": timeout}
        op = self._c.request("PUT", _path(name, "state"), json=body, wait=wait)
        return "" if wait or not isinstance(op, dict) else str(op.get("id") or "")

    def start(self, name: str) -> None:
        self.set_state(name, "start")

    def stop(self, name: str, *, force: bool = False, timeout: int = 30, wait: bool = True) -> str:
        """Stop gracefully within `timeout` seconds, or at once with `force`; see set_state."""
        return self.set_state(name, "stop", force=force, timeout=timeout, wait=wait)

    def restart(self, name: str, *, force: bool = False, timeout: int = 30) -> None:
        self.set_state(name, "restart", force=force, timeout=timeout)

    def freeze(self, name: str) -> None:
        self.set_state(name, "freeze")

    def unfreeze(self, name: str) -> None:
        self.set_state(name, "unfreeze")

    # -- config and devices ------------------------------------------------------------

    def patch(self, name: str, body: JSON) -> None:
        """Merge `body` into the instance (PATCH). Waits: the change is async."""
        self._c.request("PATCH", _path(name), json=body)

    def set_config(self, name: str, config: Mapping[str, str]) -> None:
        self.patch(name, {"config": dict(config)})

    def add_device(self, name: str, device: str, spec: Mapping[str, str]) -> None:
        self.patch(name, {"devices": {device: dict(spec)}})

    def remove_device(
        self, name: str, device: str, *, expect: Mapping[str, str] | None = None
    ) -> None:
        """Remove a device. PATCH cannot remove, so GET, edit and PUT the whole object.

        PUT replaces everything, volatile keys included: sending back exactly what GET
        returned (with its ETag) keeps the daemon's volatile keys intact. `expect`: remove
        it only if it is exactly this device (NotFound otherwise); the ETag makes the
        check and the removal one step (a change in between fails the PUT).
        """
        resp = self._c.raw_request("GET", _path(name))
        inst = resp.json()["metadata"]
        devices = dict(inst.get("devices") or {})
        if device not in devices:
            raise NotFound(f"instance '{name}' has no device '{device}'")
        if expect is not None and dict(devices[device]) != dict(expect):
            raise NotFound(f"instance '{name}' has another device '{device}'")
        del devices[device]
        body = {
            k: inst[k]
            for k in ("architecture", "config", "ephemeral", "profiles", "description", "stateful")
            if k in inst
        }
        body["devices"] = devices
        etag = resp.headers.get("ETag")
        self._c.request("PUT", _path(name), json=body, headers={"If-Match": etag} if etag else None)

    def metadata(self, name: str) -> JSON:
        """The instance's image metadata (`metadata.yaml`: properties and file templates)."""
        return dict(self._c.get(_path(name, "metadata")) or {})

    def set_metadata(self, name: str, metadata: JSON) -> None:
        self._c.request("PUT", _path(name, "metadata"), json=metadata)

    def rename(self, name: str, new_name: str) -> None:
        self._c.request("POST", _path(name), json={"name": new_name})

    # -- snapshots -----------------------------------------------------------------------

    def snapshots(self, name: str) -> builtins.list[Snapshot]:
        data = self._c.get(_path(name, "snapshots"), recursion=1)
        return [Snapshot.from_api(d) for d in data or ()]

    def snapshot(self, name: str, snap: str) -> Snapshot:
        return Snapshot.from_api(self._c.get(_path(name, "snapshots", quote(snap, safe=""))))

    def create_snapshot(self, name: str, snap: str, *, stateful: bool = False) -> None:
        body: dict[str, Any] = {"name": snap, "stateful": stateful}
        self._c.request("POST", _path(name, "snapshots"), json=body)

    def restore_snapshot(self, name: str, snap: str, *, stateful: bool = False) -> None:
        self._c.request("PUT", _path(name), json={"restore": snap, "stateful": stateful})

    def delete_snapshot(self, name: str, snap: str) -> None:
        self._c.request("DELETE", _path(name, "snapshots", quote(snap, safe="")))

    # -- logs ----------------------------------------------------------------------------

    def delete_log(self, url: str) -> None:
        """Delete an exec record-output log (they accumulate on the daemon otherwise)."""
        self._c.request("DELETE", url.split("?", 1)[0])
