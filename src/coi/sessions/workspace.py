"""The workspace and extra mounts: path resolution, validation, and whose uid owns the files."""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from coi import labels
from coi.errors import UsageError

FORBIDDEN_TARGETS = (
    "/",
    "/etc",
    "/bin",
    "/sbin",
    "/usr",
    "/root",
    "/boot",
    "/sys",
    "/proc",
    "/dev",
    "/lib",
    "/lib64",
    "/home/code",
)


# Host credentials that must never be inside a sandbox (relative to the user's home).
CREDENTIAL_PATHS = (
    ".ssh",
    ".gnupg",
    ".aws",
    ".azure",
    ".config/gcloud",
    ".config/gh",
    ".config/lxc",
    ".config/incus",
    ".kube",
    ".docker",
    ".gitconfig",
    ".git-credentials",
    ".netrc",
    ".pypirc",
    ".npmrc",
)


def exposed_credentials(sources: Iterable[Path], home: Path) -> list[Path]:
    """Credential files or folders of `home` that one of the mount sources would expose."""
    found: list[Path] = []
    home = Path(os.path.realpath(home))
    for src in (Path(os.path.realpath(s)) for s in sources):
        for rel in CREDENTIAL_PATHS:
            path = home / rel
            if (path == src or src in path.parents) and os.path.lexists(path):
                found.append(path)
    return sorted(set(found))


def check_no_credentials(sources: Iterable[Path], home: Path | None = None) -> None:
    """Refuse to mount a folder holding the user's keys (a home directory, typically).

    :raises UsageError: naming what would be exposed.
    """
    home = home or Path(os.path.expanduser("~"))
    exposed = exposed_credentials(list(sources), home)
    if exposed:
        raise UsageError(
            "refusing to mount a folder that holds your credentials: "
            + ", ".join(str(p) for p in exposed),
            details="Everything in the workspace and in extra mounts is readable by the agent.",
            resolution="Run coi in a project folder (cd ~/src/project) or pass --workspace DIR; "
            "mount single folders with --mount instead of your home directory.",
        )


@dataclass(frozen=True)
class Mount:
    """A host directory (or file) visible inside the container."""

    host: Path
    container: str
    readonly: bool = False


def resolve_workspace(path: str | None) -> Path:
    """Absolute workspace path, without resolving symlinks (container names hash this string)."""
    ws = Path(os.path.abspath(os.path.expanduser(path or ".")))
    if not ws.is_dir():
        raise UsageError(
            f"workspace '{ws}' is not a directory",
            resolution="Pass an existing folder with --workspace.",
        )
    return ws


def parse_mount(spec: str) -> Mount:
    """`HOST:CONTAINER` (optionally `:ro`) -> Mount.

    :raises UsageError: malformed spec, missing source, or relative container path.
    """
    parts = spec.split(":")
    readonly = False
    if len(parts) == 3 and parts[2] in ("ro", "rw"):
        readonly = parts[2] == "ro"
        parts = parts[:2]
    if len(parts) != 2 or not parts[0] or not parts[1]:
        raise UsageError(f"invalid mount format '{spec}': expected HOST:CONTAINER")
    return make_mount(parts[0], parts[1], readonly=readonly)


def make_mount(host: str, container: str, *, readonly: bool = False) -> Mount:
    src = Path(os.path.abspath(os.path.expanduser(host)))
    if not src.exists():
        raise UsageError(
            f"mount source does not exist: {src}", resolution="Create it first, or fix the path."
        )
    if not container.startswith("/"):
        raise UsageError(f"container path must be absolute: {container}")
    target = posixpath.normpath(container)
    if target in FORBIDDEN_TARGETS:
        raise UsageError(f"cannot mount over {target}: the container needs it")
    return Mount(src, target, readonly)


def merge_mounts(
    config_mounts: Iterable[Mapping[str, str]], cli_specs: Iterable[str], workspace_target: str
) -> list[Mount]:
    """Config mounts, then CLI mounts (a CLI mount replaces a config one at the same path)."""
    by_target: dict[str, Mount] = {}
    for m in config_mounts:
        mount = make_mount(m["host"], m["container"])
        by_target[mount.container] = mount
    for spec in cli_specs:
        mount = parse_mount(spec)
        by_target[mount.container] = mount
    mounts = list(by_target.values())
    targets = [workspace_target, *[m.container for m in mounts]]
    for i, a in enumerate(targets):
        for b in targets[i + 1 :]:
            if a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/"):
                raise UsageError(f"nested mount paths detected: '{a}' and '{b}' conflict")
    return mounts


def host_owner_uid(workspace: Path, env: Mapping[str, str] | None = None) -> int:
    """The host uid whose files the agent's files should be: the user who ran coi.

    Under sudo that is the calling user; root running coi in a user's folder maps the
    folder's owner.
    """
    env = os.environ if env is None else env
    uid = os.getuid()
    if uid == 0 and env.get("SUDO_UID", "").isdigit():
        uid = int(env["SUDO_UID"])
    if uid == 0:
        uid = workspace.stat().st_uid
    return uid


ROOT_SUBID = "root:0:1"
SUBID_FILES = (Path("/etc/subuid"), Path("/etc/subgid"))
# On coi's storage pool: whether the daemon starts containers without re-owning their files
# ("true"/"false"), as `coi setup` saw it (the API has no flag that says so: LXD 5.0 reports
# idmapped mounts and still re-owns every container at its first start).


def can_map_root(pool_config: Mapping[str, str], idmapped_mounts: bool) -> bool:
    """Whether host root can be mapped into a container: setup's verdict, else the server's
    idmapped mount flags."""
    verdict = pool_config.get(labels.MAP_ROOT)
    return verdict == "true" if verdict in ("true", "false") else idmapped_mounts


def root_mapping_problem(
    can_map: bool, *, local: bool, subid_files: Iterable[Path] = SUBID_FILES
) -> str | None:
    """Why host root cannot be the agent's uid in a container, or None when it can.

    The daemon maps host uid 0 with `raw.idmap` only where it does not re-own a container's
    files at its start (LXD 5.0's start-up re-owns them with the map and fails), and only if
    root may delegate uid 0: `root:0:1` in /etc/subuid and /etc/subgid.
    """
    if not can_map:
        return (
            "this daemon cannot map host root into a container "
            "(it re-owns a container's files at its start)"
        )
    if local:
        for f in subid_files:
            try:
                lines = f.read_text().split()
            except OSError:
                lines = []
            if ROOT_SUBID not in lines:
                return f"{f} has no '{ROOT_SUBID}' entry, so the daemon may not map host root"
    return None


def _covers(lines: Iterable[str], ident: int) -> bool:
    """Whether a `root:START:COUNT` line lets root delegate `ident`."""
    for line in lines:
        parts = line.strip().split(":")
        if len(parts) != 3 or parts[0] != "root" or not (parts[1] + parts[2]).isdigit():
            continue
        if int(parts[1]) <= ident < int(parts[1]) + int(parts[2]):
            return True
    return False


def owner_mapping_problem(
    uid: int, gid: int, *, subid_files: tuple[Path, Path] = SUBID_FILES
) -> str | None:
    """Why the daemon (root, on this machine) may not map the workspace owner's uid or gid
    into the container (`raw.idmap`), or None when it may: each needs a root entry covering
    it in /etc/subuid and /etc/subgid (`coi setup` adds `root:UID:1` for the users it
    knows). Unreadable files say nothing: the daemon will."""
    for f, ident, what in ((subid_files[0], uid, "uid"), (subid_files[1], gid, "gid")):
        try:
            lines = f.read_text().splitlines()
        except OSError:
            continue
        if not _covers(lines, ident):
            return f"its {what} {ident} is not delegated to root in {f}"
    return None


def host_owner_gid(workspace: Path, uid: int, env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    if uid == os.getuid():
        return os.getgid()
    if env.get("SUDO_GID", "").isdigit() and str(uid) == env.get("SUDO_UID"):
        return int(env["SUDO_GID"])
    return workspace.stat().st_gid
