"""Networks (bridges), network ACLs and storage pools."""

from __future__ import annotations

import builtins
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote

from coi.backend.models import Network, NetworkACL, StoragePool
from coi.errors import BackendError, Conflict, NotFound

if TYPE_CHECKING:
    from coi.backend.client import IncusClient


class NetworksAPI:
    """`/1.0/networks`, `/1.0/network-acls` and `/1.0/storage-pools`."""

    def __init__(self, client: IncusClient) -> None:
        self._c = client

    # -- networks -----------------------------------------------------------------------

    def list(self) -> builtins.list[Network]:
        return [Network.from_api(d) for d in self._c.get("/1.0/networks", recursion=1) or ()]

    def get(self, name: str) -> Network | None:
        try:
            return Network.from_api(self._c.get(f"/1.0/networks/{quote(name, safe='')}"))
        except NotFound:
            return None

    def create(
        self, name: str, *, config: Mapping[str, str], type: str = "bridge", description: str = ""
    ) -> None:
        """Make a managed network. On a cluster, as the daemon wants it there: pending on
        every member first (`?target=`, with no member-specific keys), then the global
        create with the config, which brings it up on each member."""
        if self._c.server.clustered:
            for member in self._c.cluster_members():
                try:
                    self._c.request(
                        "POST",
                        "/1.0/networks",
                        params={"target": member},
                        json={"name": name, "type": type, "config": {}},
                    )
                except Conflict:
                    pass  # pending there already (another coi began it a moment ago)
                except BackendError as err:
                    if "not in pending state" not in err.message:
                        raise
                    # Made in full a moment ago (another coi): what a plain create says then.
                    raise Conflict(err.message, status_code=409) from err
        self._c.request(
            "POST",
            "/1.0/networks",
            json={"name": name, "type": type, "config": dict(config), "description": description},
        )

    def patch(self, name: str, config: Mapping[str, str], *, description: str) -> None:
        """Merge `config` into the network's. The daemon clears a description the request
        leaves out, so the caller passes the one to keep."""
        _settled(
            lambda: self._c.request(
                "PATCH",
                f"/1.0/networks/{quote(name, safe='')}",
                json={"config": dict(config), "description": description},
            )
        )

    def delete(self, name: str) -> None:
        _settled(lambda: self._c.request("DELETE", f"/1.0/networks/{quote(name, safe='')}"))

    # -- ACLs ----------------------------------------------------------------------------

    def acls(self) -> builtins.list[NetworkACL]:
        if not self._c.has_extension("network_acl"):
            return []
        return [NetworkACL.from_api(d) for d in self._c.get("/1.0/network-acls", recursion=1) or ()]

    def acl(self, name: str) -> NetworkACL | None:
        try:
            return NetworkACL.from_api(self._c.get(f"/1.0/network-acls/{quote(name, safe='')}"))
        except NotFound:
            return None

    def create_acl(
        self,
        name: str,
        *,
        egress: Sequence[Mapping[str, str]] = (),
        ingress: Sequence[Mapping[str, str]] = (),
        description: str = "",
        config: Mapping[str, str] | None = None,
    ) -> None:
        self._c.request(
            "POST",
            "/1.0/network-acls",
            json={
                "name": name,
                "description": description,
                "egress": [dict(r) for r in egress],
                "ingress": [dict(r) for r in ingress],
                "config": dict(config or {}),
            },
        )

    def update_acl(
        self,
        name: str,
        *,
        egress: Sequence[Mapping[str, str]],
        ingress: Sequence[Mapping[str, str]],
        description: str = "",
        config: Mapping[str, str] | None = None,
    ) -> None:
        """Replace an ACL's rules (PUT); its config is kept unless one is given."""
        body: dict[str, object] = {
            "description": description,
            "egress": [dict(r) for r in egress],
            "ingress": [dict(r) for r in ingress],
        }
        current = self.acl(name)
        body["config"] = (
            dict(config) if config is not None else dict(current.config if current else {})
        )
        _settled(
            lambda: self._c.request("PUT", f"/1.0/network-acls/{quote(name, safe='')}", json=body)
        )

    def delete_acl(self, name: str) -> None:
        self._c.request("DELETE", f"/1.0/network-acls/{quote(name, safe='')}")

    # -- storage pools -------------------------------------------------------------------

    def pools(self) -> builtins.list[StoragePool]:
        return [
            StoragePool.from_api(d) for d in self._c.get("/1.0/storage-pools", recursion=1) or ()
        ]

    def pool(self, name: str) -> StoragePool | None:
        try:
            return StoragePool.from_api(self._c.get(f"/1.0/storage-pools/{quote(name, safe='')}"))
        except NotFound:
            return None

    def patch_pool(self, name: str, config: Mapping[str, str]) -> None:
        """Merge `config` into a storage pool's config."""
        self._c.request(
            "PATCH", f"/1.0/storage-pools/{quote(name, safe='')}", json={"config": dict(config)}
        )

    def create_pool(self, name: str, *, driver: str, config: Mapping[str, str]) -> None:
        self._c.request(
            "POST",
            "/1.0/storage-pools",
            json={"name": name, "driver": driver, "config": dict(config)},
        )

    def delete_pool(self, name: str) -> None:
        self._c.request("DELETE", f"/1.0/storage-pools/{quote(name, safe='')}")

    # -- custom volumes (in the client's project) -----------------------------------------

    def _volume_path(self, pool: str, name: str = "") -> str:
        path = f"/1.0/storage-pools/{quote(pool, safe='')}/volumes/custom"
        return f"{path}/{quote(name, safe='')}" if name else path

    def volume_exists(self, pool: str, name: str) -> bool:
        try:
            self._c.get(self._volume_path(pool, name))
        except NotFound:
            return False
        return True

    def volumes(self, pool: str) -> builtins.list[str]:
        """The names of the custom volumes on `pool` in the client's project."""
        urls = self._c.get(self._volume_path(pool)) or ()
        return [unquote(u.split("?", 1)[0].rsplit("/", 1)[-1]) for u in urls]

    def create_volume(self, pool: str, name: str, *, description: str = "") -> None:
        """A custom filesystem volume on `pool`."""
        body = {"name": name, "type": "custom", "content_type": "filesystem"}
        self._c.request("POST", self._volume_path(pool), json={**body, "description": description})

    def delete_volume(self, pool: str, name: str) -> None:
        self._c.request("DELETE", self._volume_path(pool, name))


# Incus lists a bridge's interfaces when it changes or deletes the bridge; a container's veth
# that goes away meanwhile (another sandbox stopping) fails the request with the first. Two
# ACL updates applied to the firewall at once fail one with the second (its chain flushed by
# the other). Seen under load on Incus 6.0: the request done again a moment later works.
_TRANSIENT = ("failed to delete bridge children interfaces", "flush chain")


def _settled(call: Callable[[], object], attempts: int = 3) -> None:
    for attempt in range(attempts):
        try:
            call()
            return
        except BackendError as err:
            text = str(err).lower()
            if not any(t in text for t in _TRANSIENT) or attempt == attempts - 1:
                raise
            time.sleep(0.3 * (attempt + 1))
