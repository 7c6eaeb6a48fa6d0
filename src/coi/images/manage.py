"""Local images by alias: listing, publishing a container, checking, deleting, and installing
the tiny test image. Each returns what it found or did for the caller to show."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from coi.backend.client import IncusClient
from coi.backend.models import Image
from coi.errors import Conflict, NotFound
from coi.images.tiny import DESCRIPTION, TINY_ALIAS, build_tarball


@dataclass(frozen=True)
class Published:
    fingerprint: str
    alias: str


@dataclass(frozen=True)
class TinyBuild:
    """`skipped`: the image was there and not rebuilt (its `fingerprint` is then empty)."""

    alias: str
    fingerprint: str
    skipped: bool = False


def local_images(client: IncusClient) -> list[Image]:
    """Every local image."""
    return client.images.list()


def aliases(client: IncusClient) -> list[str]:
    """Every alias of every local image."""
    return [a for i in client.images.list() for a in i.aliases]


def exists(client: IncusClient, alias: str) -> bool:
    return client.images.exists(alias)


def publish(client: IncusClient, container: str, alias: str, *, description: str) -> Published:
    """Publish a container as image `alias`: it is stopped first, and deleted after.

    :raises Conflict: the alias is taken.
    """
    if client.images.exists(alias):
        raise Conflict(
            f"image alias '{alias}' already exists",
            resolution=f"Pick another alias or delete it: coi image delete {alias}",
        )
    if client.instances.get(container).active:
        client.instances.stop(container, force=True)
    props = {"description": description} if description else {}
    fp = client.images.publish(instance=container, aliases=(alias,), properties=props)
    client.instances.delete(container, force=True)
    return Published(fp, alias)


def delete(client: IncusClient, alias: str) -> str:
    """Delete the image an alias names; its fingerprint.

    :raises NotFound: no image has that alias.
    """
    fp = client.images.alias_target(alias)
    if fp is None:
        raise NotFound(
            f"image '{alias}' not found", resolution="See the images with 'coi image list'."
        )
    client.images.delete(fp)
    return fp


def build_tiny(client: IncusClient, *, force: bool) -> TinyBuild:
    """Build the tiny image and point its alias at it (the image it replaces is deleted);
    skipped when it exists, unless `force`."""
    old = client.images.alias_target(TINY_ALIAS)
    if old and not force:
        return TinyBuild(TINY_ALIAS, "", skipped=True)
    with tempfile.TemporaryDirectory(prefix="coi-tiny-") as tmp:
        tarball = build_tarball(Path(tmp) / "tiny.tar")
        fp = client.images.import_tarball(tarball, properties={"description": DESCRIPTION})
    client.images.set_alias(TINY_ALIAS, fp)
    if old and old != fp:
        client.images.delete(old)
    return TinyBuild(TINY_ALIAS, fp)
