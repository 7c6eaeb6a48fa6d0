"""`coi clean`: find what coi left behind (containers, sessions, network objects) and remove it."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from coi import checkpoint
from coi.backend.client import IncusClient
from coi.config.loader import Config
from coi.config.paths import coi_home
from coi.errors import BackendError, NotFound
from coi.images import builder
from coi.locks import tried
from coi.network import resources
from coi.protection.guard import settle
from coi.sessions import inventory, template, warm
from coi.sessions.inventory import ContainerInfo, SavedSession
from coi.sessions.slots import claimed_containers, stale_claims


@dataclass
class CleanPlan:
    """Everything `coi clean` would remove, grouped as it reports them."""

    stopped: list[ContainerInfo] = field(default_factory=list)
    orphaned: list[ContainerInfo] = field(default_factory=list)
    kept: list[ContainerInfo] = field(default_factory=list)
    sessions: list[SavedSession] = field(default_factory=list)
    leftovers: list[Path] = field(default_factory=list)  # half-written session dirs, claims
    acls: list[str] = field(default_factory=list)
    networks: list[str] = field(default_factory=list)
    templates: list[str] = field(default_factory=list)  # pre-shifted copies of old images
    build_images: list[str] = field(
        default_factory=list
    )  # fingerprints a killed build left unnamed

    @property
    def containers(self) -> list[ContainerInfo]:
        return self.stopped + self.orphaned

    @property
    def resources(self) -> list[str]:
        return [*(f"network ACL {a}" for a in self.acls), *(f"network {n}" for n in self.networks)]

    def count(self) -> int:
        return (
            len(self.containers)
            + len(self.sessions)
            + len(self.leftovers)
            + len(self.acls)
            + len(self.networks)
            + len(self.templates)
            + len(self.build_images)
        )


def plan_containers(client: IncusClient, sessions: list[SavedSession]) -> CleanPlan:
    """Stopped sandboxes, and running `coi run` sandboxes whose coi process is gone.

    Stopped *persistent* containers are kept: they hold what the user installed, and
    removing them is what `coi kill` is for.
    """
    plan = CleanPlan()
    # A coi that holds the slot is making, using or removing that container: a sandbox being
    # made is Stopped between its create and its start, and must not go from under it.
    live = claimed_containers(coi_home() / "locks")
    for c in inventory.containers(client, sessions, with_state=False):
        if c.name in live:
            continue
        if c.status == "Stopped":
            (plan.kept if c.persistent else plan.stopped).append(c)
        elif c.running and c.orphaned:
            plan.orphaned.append(c)
    return plan


def plan_leftovers(home: Path, all_sessions: list[SavedSession]) -> list[Path]:
    """Session dirs with neither metadata nor state, interrupted pulls, dead slot claims,
    sockets of killed credential brokers."""
    from coi.credentials import sockets

    out = [s.path for s in all_sessions if s.metadata is None and not s.has_state]
    out += sorted(home.glob("sessions-*/*/.pull-*"))
    out += stale_claims(home / "locks")
    out += sockets.stale(home)
    return out


def plan_network(client: IncusClient) -> tuple[list[str], list[str]]:
    """(ACLs, bridges) coi made that nothing uses."""
    nets = [n.name for n in resources.unused_networks(client)]
    going = {f"/1.0/networks/{n}" for n in nets}
    # An ACL only the bridges about to go still name is unused too.
    acls = [
        a.name
        for a in resources.coi_acls(client)
        if all(u.split("?", 1)[0] in going for u in a.used_by)
    ]
    return acls, nets


def plan_sessions(all_sessions: list[SavedSession]) -> CleanPlan:
    """Every saved session (`coi clean --sessions` removes them all)."""
    return CleanPlan(sessions=list(all_sessions))


def plan_orphans(
    client: IncusClient, cfg: Config, home: Path, all_sessions: list[SavedSession]
) -> CleanPlan:
    """What nothing uses any more: network objects, leftover session files, and templates
    and spares of images gone (or all of them where templates or spares are turned off)."""
    acls, nets = plan_network(client)
    return CleanPlan(
        leftovers=plan_leftovers(home, all_sessions),
        acls=acls,
        networks=nets,
        templates=template.stale(
            client,
            keep_spares=cfg.get_int("incus.spares") > 0,
            keep_templates=templates_wanted(client, cfg),
        )
        + ([] if cfg.get_int("sandbox.running_spares") > 0 else running_spares(client)),
        build_images=builder.orphans(client),
    )


def running_spares(client: IncusClient) -> list[str]:
    """Every running spare (coi.sessions.warm), for `coi clean` when they are turned off;
    not one a coi holds the slot of (being made, or being taken)."""
    live = claimed_containers(coi_home() / "locks")
    return [i.name for i in client.instances.list() if warm.is_spare(i) and i.name not in live]


def templates_wanted(client: IncusClient, cfg: Config) -> bool:
    """Keep templates unless turned off, or (auto) where they do not pay off."""
    mode = cfg.get_str("incus.templates")
    if mode in ("never", "false"):
        return False
    return mode == "always" or template.pay_off(client, cfg.get_str("incus.pool"))


def execute(client: IncusClient, plan: CleanPlan, log: Callable[[str], None]) -> int:
    """Remove what the plan names; return how many items went. Failures are logged, not fatal."""
    done = 0
    for c in plan.containers:
        log(f"Deleting container {c.name}...")
        try:
            client.instances.delete(c.name, force=True)
            done += 1
        except NotFound:
            done += 1
        except BackendError as err:
            log(f"  Warning: could not delete {c.name}: {err}")
            continue
        settle(c.name, removed=True, log=log)
        checkpoint.step("clean-removing")
    for t in plan.templates:
        log(f"Deleting {t}...")
        try:
            client.instances.delete(t, force=True)
            done += 1
        except BackendError as err:
            log(f"  Warning: could not delete {t}: {err}")
    for fp in plan.build_images:
        log(f"Deleting image {fp[:12]}...")
        try:
            client.images.delete(fp)
            done += 1
        except BackendError as err:
            log(f"  Warning: could not delete image {fp[:12]}: {err}")
    for s in plan.sessions:
        log(f"Deleting session {s.id}...")
        shutil.rmtree(s.path, ignore_errors=True)
        done += 1
    for p in plan.leftovers:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        done += 1
    if plan.networks or plan.acls:
        # Not while a sandbox is starting (between making its bridge and attaching to it a
        # bridge looks unused): every starting coi holds this lock shared.
        with tried(coi_home() / "locks" / f"{template.STARTING_LOCK}.lock") as quiet:
            if quiet:
                done += _delete_network_objects(client, plan, log)
            else:
                log("Sandboxes are starting: unused network objects are left for the next clean")
    return done


def _delete_network_objects(
    client: IncusClient, plan: CleanPlan, log: Callable[[str], None]
) -> int:
    done = 0
    # Bridges first: an ACL cannot be deleted while a bridge still names it.
    for kind, names, delete in (
        ("network", plan.networks, resources.delete_network),
        ("network ACL", plan.acls, resources.delete_acl),
    ):
        for name in names:
            log(f"Deleting {kind} {name}...")
            try:
                delete(client, name)
                done += 1
            except BackendError as err:
                log(f"  Warning: could not delete {kind} {name}: {err}")
    return done
