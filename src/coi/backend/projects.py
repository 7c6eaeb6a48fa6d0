"""Projects: the daemon's namespaces for instances, images and profiles."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING
from urllib.parse import quote

from coi.errors import NotFound

if TYPE_CHECKING:
    from coi.backend.client import IncusClient


class ProjectsAPI:
    """`/1.0/projects` (and the profiles inside one)."""

    def __init__(self, client: IncusClient) -> None:
        self._c = client

    def names(self) -> list[str]:
        return [u.rsplit("/", 1)[-1] for u in self._c.get("/1.0/projects") or ()]

    def exists(self, name: str) -> bool:
        try:
            self._c.get(f"/1.0/projects/{quote(name, safe='')}")
        except NotFound:
            return False
        return True

    def create(self, name: str, *, config: Mapping[str, str], description: str = "") -> None:
        self._c.request(
            "POST",
            "/1.0/projects",
            json={"name": name, "config": dict(config), "description": description},
        )

    def delete(self, name: str) -> None:
        self._c.request("DELETE", f"/1.0/projects/{quote(name, safe='')}")

    def purge(self, name: str) -> None:
        """Delete a project and everything in it: instances, images, profiles' devices."""
        if not self.exists(name):
            return
        scoped = self._c.with_project(name)
        try:
            for inst in scoped.instances.list():
                scoped.instances.delete(inst.name, force=True)
            for img in scoped.images.list():
                try:
                    scoped.images.delete(img.fingerprint)
                except NotFound:
                    pass
            # Custom volumes (coi's review copies) block the project's removal too; a
            # project without volumes of its own lists the default project's: not ours.
            own = self._c.get(f"/1.0/projects/{quote(name, safe='')}").get("config", {})
            pools = scoped.networks.pools() if own.get("features.storage.volumes") == "true" else []
            for pool in pools:
                for volume in scoped.networks.volumes(pool.name):
                    try:
                        scoped.networks.delete_volume(pool.name, volume)
                    except NotFound:
                        pass
            # The project's default profile holds devices that reference pools/networks.
            try:
                scoped.request(
                    "PUT",
                    "/1.0/profiles/default",
                    json={"config": {}, "devices": {}, "description": ""},
                )
            except NotFound:
                pass
        finally:
            scoped.close()
        self.delete(name)
