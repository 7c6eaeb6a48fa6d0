"""The daemon objects coi's network policies are made of, marked so `coi clean` can find them."""

from __future__ import annotations

from collections.abc import Mapping

from coi import labels
from coi.backend.client import IncusClient
from coi.backend.models import Network, NetworkACL
from coi.errors import NotFound

# Every bridge and ACL coi creates carries this key; nothing else is ever removed.
NAME_PREFIX = "coi-"


def managed_config() -> dict[str, str]:
    """Config keys that mark a bridge or ACL as coi's."""
    return {labels.MANAGED: "true"}


def _ours(name: str, config: Mapping[str, str]) -> bool:
    return name.startswith(NAME_PREFIX) and config.get(labels.MANAGED) == "true"


def coi_acls(client: IncusClient) -> list[NetworkACL]:
    """The ACLs coi made."""
    return [a for a in client.networks.acls() if _ours(a.name, a.config)]


def unused_networks(client: IncusClient) -> list[Network]:
    """coi's bridges that no instance or profile uses any more."""
    return [n for n in client.networks.list() if _ours(n.name, n.config) and not n.used_by]


def delete_acl(client: IncusClient, name: str) -> None:
    try:
        client.networks.delete_acl(name)
    except NotFound:
        pass


def delete_network(client: IncusClient, name: str) -> None:
    try:
        client.networks.delete(name)
    except NotFound:
        pass
