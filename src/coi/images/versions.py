"""Versioned image aliases (`<prefix>YYYYMMDD-HHMMSS`): naming them and pruning old ones."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from coi.backend.client import IncusClient
from coi.backend.models import Image
from coi.errors import UsageError

_STAMP = r"\d{8}-\d{6}"


def version_alias(prefix: str, when: datetime | None = None) -> str:
    """A new version alias, e.g. `coi-20261126-174501`."""
    return prefix + (when or datetime.now()).strftime("%Y%m%d-%H%M%S")


def is_version_of(alias: str, prefix: str) -> bool:
    return re.fullmatch(re.escape(prefix) + _STAMP, alias) is not None


@dataclass(frozen=True)
class CleanupResult:
    deleted: list[str]
    kept: list[str]


def plan_cleanup(aliases: list[str], prefix: str, keep: int) -> CleanupResult:
    """Which versions of `prefix` go and which stay (the `keep` newest).

    :raises UsageError: keep is not positive.
    """
    if keep <= 0:
        raise UsageError("--keep must be > 0")
    versions = sorted((a for a in aliases if is_version_of(a, prefix)), reverse=True)
    return CleanupResult(deleted=versions[keep:], kept=versions[:keep])


def cleanup(client: IncusClient, prefix: str, keep: int) -> CleanupResult:
    """Delete old versions; an image is deleted only when no other alias still points at it."""
    images = client.images.list()
    by_alias: dict[str, Image] = {a: i for i in images for a in i.aliases}
    result = plan_cleanup(list(by_alias), prefix, keep)
    gone: set[str] = set()
    for alias in result.deleted:
        image = by_alias[alias]
        if image.fingerprint in gone:
            continue
        if any(a not in result.deleted for a in image.aliases):
            client.images.delete_alias(alias)  # e.g. `coi` still points at it
        else:
            client.images.delete(image.fingerprint)
            gone.add(image.fingerprint)
    return result
