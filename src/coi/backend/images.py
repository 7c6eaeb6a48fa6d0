"""Images: import unified tarballs, list, aliases, publish from instances or snapshots, delete."""

from __future__ import annotations

import builtins
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

from coi.backend.models import JSON, Image
from coi.errors import NotFound

if TYPE_CHECKING:
    from coi.backend.client import IncusClient

_CHUNK = 1024 * 1024


class ImagesAPI:
    """`/1.0/images` and `/1.0/images/aliases`."""

    def __init__(self, client: IncusClient) -> None:
        self._c = client

    def list(self) -> builtins.list[Image]:
        return [Image.from_api(d) for d in self._c.get("/1.0/images", recursion=1) or ()]

    def get(self, fingerprint: str) -> Image:
        return Image.from_api(self._c.get(f"/1.0/images/{quote(fingerprint, safe='')}"))

    def alias_target(self, alias: str) -> str | None:
        """The fingerprint an alias points to, or None."""
        try:
            data = self._c.get(f"/1.0/images/aliases/{quote(alias, safe='')}")
        except NotFound:
            return None
        return str(data.get("target") or "") or None

    def by_alias(self, alias: str) -> Image | None:
        fp = self.alias_target(alias)
        return self.get(fp) if fp else None

    def exists(self, alias: str) -> bool:
        return self.alias_target(alias) is not None

    def exists_fingerprint(self, fingerprint: str) -> bool:
        try:
            self._c.get(f"/1.0/images/{quote(fingerprint, safe='')}")
        except NotFound:
            return False
        return True

    def create_alias(self, alias: str, fingerprint: str, *, description: str = "") -> None:
        self._c.request(
            "POST",
            "/1.0/images/aliases",
            json={"name": alias, "target": fingerprint, "description": description},
        )

    def set_alias(self, alias: str, fingerprint: str) -> None:
        """Point `alias` at `fingerprint`, creating or moving it."""
        if self.alias_target(alias) is None:
            self.create_alias(alias, fingerprint)
        else:
            # PUT, not PATCH: LXD 5.0's PATCH on an alias hangs until its context times out.
            self._c.request(
                "PUT",
                f"/1.0/images/aliases/{quote(alias, safe='')}",
                json={"target": fingerprint, "description": ""},
            )

    def delete_alias(self, alias: str) -> None:
        self._c.request("DELETE", f"/1.0/images/aliases/{quote(alias, safe='')}")

    def delete(self, fingerprint: str) -> None:
        self._c.request("DELETE", f"/1.0/images/{quote(fingerprint, safe='')}")

    def import_tarball(
        self,
        tarball: Path,
        *,
        aliases: tuple[str, ...] = (),
        properties: Mapping[str, str] | None = None,
    ) -> str:
        """Upload a unified image tarball (metadata.yaml + rootfs/); return its fingerprint."""

        def chunks() -> Iterator[bytes]:
            with tarball.open("rb") as fh:
                while chunk := fh.read(_CHUNK):
                    yield chunk

        headers = {"Content-Type": "application/octet-stream"}
        if properties:
            from urllib.parse import urlencode

            headers[f"{self._c.header_prefix}properties"] = urlencode(dict(properties))
        op = self._c.request("POST", "/1.0/images", content=chunks(), headers=headers, timeout=600)
        fp = str((op.get("metadata") or {}).get("fingerprint") or "")
        for alias in aliases:
            self.set_alias(alias, fp)
        return fp

    def publish(
        self,
        *,
        instance: str,
        snapshot: str | None = None,
        aliases: tuple[str, ...] = (),
        properties: Mapping[str, str] | None = None,
    ) -> str:
        """Publish a stopped instance, or a snapshot, as an image; return its fingerprint."""
        source: JSON = (
            {"type": "snapshot", "name": f"{instance}/{snapshot}"}
            if snapshot
            else {"type": "instance", "name": instance}
        )
        body: JSON = {
            "source": source,
            "properties": dict(properties or {}),
            "compression_algorithm": "none",
        }
        op = self._c.request("POST", "/1.0/images", json=body, timeout=600)
        fp = str((op.get("metadata") or {}).get("fingerprint") or "")
        for alias in aliases:
            self.set_alias(alias, fp)
        return fp
