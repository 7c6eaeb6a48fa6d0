"""Names people choose for sandboxes (`--name`, `coi alias`): kept on the container itself.

An alias is the daemon's `user.coi.alias` key on the container, not a file of coi's:
- it lives and dies with its container: a container removed by any means (`coi kill`,
  `incus delete`, another machine's coi, the daemon's own ephemeral clean-up) takes its
  alias with it, so no alias ever names a container that is gone, or a new one that
  happens to get the old name;
- the daemon writes it in one request, so there is no file to be half-written;
- `coi list` reads it in the listing it makes anyway: no extra request.
Uniqueness is checked against every container of the daemon project, under a lock per
alias in coi's state dir, so two coi processes of a user cannot both take one name.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from coi import labels
from coi.backend.client import IncusClient
from coi.backend.models import Instance
from coi.errors import Conflict, NotFound, UsageError
from coi.locks import held
from coi.sessions import naming

_ALIAS = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,62}")


def check(alias: str) -> str:
    """A valid alias, or UsageError saying why not.

    It starts with a letter (so it is never a slot number or a flag), and may not have the
    shape of a coi container name: a container's own name always wins over an alias.
    """
    if not _ALIAS.fullmatch(alias):
        raise UsageError(
            f"invalid name '{alias}'",
            resolution="A name starts with a letter and has up to 63 letters, digits, "
            "'.', '_' or '-', e.g. --name web.",
        )
    if naming.parse_name(alias) is not None:
        raise UsageError(
            f"invalid name '{alias}': it looks like a coi container name",
            resolution="Choose a name that does not, e.g. --name web.",
        )
    return alias


def alias_of(inst: Instance) -> str:
    return inst.config.get(labels.ALIAS, "")


def all_aliases(client: IncusClient) -> dict[str, str]:
    """alias -> container, for every container of the project that has one."""
    return {alias_of(i): i.name for i in client.instances.list() if alias_of(i)}


def resolve(client: IncusClient, name: str) -> str:
    """The container `name` means: a container of that name, else the one whose alias it
    is, else `name` itself (the caller then says it does not exist)."""
    insts = client.instances.list()
    if any(i.name == name for i in insts):
        return name
    for i in insts:
        if alias_of(i) == name:
            return i.name
    return name


@contextmanager
def reserved(lock_dir: Path, alias: str) -> Iterator[None]:
    """Hold this alias's lock: no other coi of this user sets it meanwhile."""
    with held(lock_dir / f"alias-{alias}.lock"):
        yield


def check_free(client: IncusClient, alias: str, *, container: str) -> None:
    """`alias` may be given to `container`: no other container has it or is named so.

    :raises Conflict: it is taken.
    """
    for i in client.instances.list():
        if i.name == container:
            continue
        if alias_of(i) == alias or i.name == alias:
            raise Conflict(
                f"the name '{alias}' is taken by container {i.name}",
                resolution=f"Choose another name, or free it first: 'coi alias --remove {alias}'.",
            )


def set_alias(client: IncusClient, container: str, alias: str, *, lock_dir: Path) -> str:
    """Give `container` (a container name or an alias) the alias `alias`; its name.

    :raises UsageError: the alias is malformed. :raises NotFound: no such container.
    :raises Conflict: another container has the alias.
    """
    check(alias)
    with reserved(lock_dir, alias):
        target = resolve(client, container)
        if not client.instances.exists(target):
            raise NotFound(
                f"container '{container}' not found",
                resolution="See the containers with 'coi list'.",
            )
        check_free(client, alias, container=target)
        client.instances.set_config(target, {labels.ALIAS: alias})
    return target


def remove_alias(client: IncusClient, name: str) -> tuple[str, str]:
    """Take the alias off a container (named by its alias or its own name): (container,
    the alias it had).

    :raises NotFound: no container has that alias or name, or it has no alias.
    """
    target = resolve(client, name)
    try:
        alias = alias_of(client.instances.get(target))
    except NotFound:
        alias = ""
    if not alias:
        raise NotFound(f"no alias '{name}'", resolution="See the aliases with 'coi alias --list'.")
    # An empty value removes the key from the container's config.
    client.instances.set_config(target, {labels.ALIAS: ""})
    return target, alias
