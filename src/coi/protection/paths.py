"""Which workspace paths are protected, and the read-only mounts guarding them inside."""

from __future__ import annotations

import fnmatch
import os
import posixpath
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from coi.config.loader import Config
from coi.errors import ConfigError


@dataclass(frozen=True)
class ProtectedPath:
    """A path relative to the workspace and what it was when the session started."""

    rel: str
    kind: str  # "dir", "file", "symlink" or "absent"


@dataclass
class ProtectionPlan:
    """What to guard in one workspace; `paths` empty means protection is off."""

    workspace: Path
    paths: list[ProtectedPath] = field(default_factory=list)
    # `.git` is a real directory holding protected paths: it becomes a mount point so it
    # cannot be renamed away with the read-only mounts inside it.
    git_dir_mount: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def enabled(self) -> bool:
        return bool(self.paths)

    @property
    def rels(self) -> list[str]:
        return [p.rel for p in self.paths]


# coi's own workspace config is protected whatever the list says (while protection is on):
# an agent that could write it would choose the next session's settings (see
# coi.config.untrusted for the second line of defence).
ALWAYS = (".coi.toml", ".coi")


def configured_paths(cfg: Config) -> list[str]:
    """The protected list from config, normalised; [] when protection is turned off.

    :raises ConfigError: an entry is absolute or leaves the workspace.
    """
    if cfg.get_bool("security.disable_protection") or cfg.get_bool("git.writable_hooks"):
        return []
    out: list[str] = []
    for key in ("security.protected_paths", "security.additional_protected_paths"):
        for raw in cfg.get_list(key):
            rel = normalise(str(raw), key)
            if rel not in out:
                out.append(rel)
    return out + [rel for rel in ALWAYS if rel not in out]


def normalise(raw: str, key: str = "security.protected_paths") -> str:
    rel = posixpath.normpath(raw.strip())
    if not raw.strip() or raw.startswith("/") or rel == "." or rel.split("/")[0] == "..":
        raise ConfigError(
            f"invalid {key} entry '{raw}': expected a path inside the workspace",
            resolution="Use a relative path such as .git/hooks or .vscode.",
        )
    return rel


def _kind(path: Path) -> str:
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return "absent"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISDIR(mode):
        return "dir"
    return "file"


def _symlinked_parent(workspace: Path, rel: str) -> str | None:
    parts = rel.split("/")
    for i in range(1, len(parts)):
        sub = "/".join(parts[:i])
        if (workspace / sub).is_symlink():
            return sub
    return None


# Folders made (empty) when absent, so they can be mounted read-only instead of being
# created by the agent; `git init` makes them in every repository anyway.
_MADE = re.compile(r"\.git/hooks|\.git/info|\.git/modules/[^/]+/hooks")


def _is_dir(path: Path) -> bool:
    return _kind(path) == "dir"


def expand(workspace: Path, rel: str) -> list[str]:
    """The paths a pattern names now: `*` (also `?`, `[...]`) matches within one component.

    Only real directories are descended into (a symlink on the way matches nothing); a
    pattern without wildcards is returned as it is, whether it exists or not.
    """
    if not any(c in rel for c in "*?["):
        return [rel]
    found = [""]
    for part in rel.split("/"):
        step: list[str] = []
        for prefix in found:
            here = workspace / prefix if prefix else workspace
            if not _is_dir(here):
                continue
            if not any(c in part for c in "*?["):
                names = [part]  # kept even when absent: it is watched for creation
            else:
                names = sorted(n for n in os.listdir(here) if fnmatch.fnmatchcase(n, part))
            step += [f"{prefix}/{n}" if prefix else n for n in names]
        found = step
    return found


def plan(workspace: Path, rels: list[str]) -> ProtectionPlan:
    """Decide what to protect in `workspace` (creating `.git/hooks` and `.git/info` in a
    repository without them).

    Patterns (`.git/modules/*/hooks`) are expanded to what exists now; a match that appears
    later is not watched.
    """
    result = ProtectionPlan(workspace)
    if not rels:
        return result
    rels = list(dict.fromkeys(r for pattern in rels for r in expand(workspace, pattern)))
    git = workspace / ".git"
    git_kind = _kind(git)
    wanted = list(rels)
    if git_kind == "file":
        # A worktree or submodule: `.git` is a pointer file. Its hooks and config live
        # outside the workspace (unreachable), but the pointer itself decides which hooks
        # and config host-side git uses, so it is protected instead.
        wanted = [r for r in wanted if not r.startswith(".git/")]
        if ".git" not in wanted:
            wanted.insert(0, ".git")
        result.notes.append(".git is a file (worktree): protecting the pointer file itself")
    elif git_kind == "dir":
        # A folder that exists can be mounted read-only; one that does not could be made
        # by the agent. So an absent one is made (empty), as `git init` would have.
        for rel in wanted:
            folder = workspace / rel
            if _MADE.fullmatch(rel) and _is_dir(folder.parent) and _kind(folder) == "absent":
                folder.mkdir(mode=0o755)
    for rel in wanted:
        bad_parent = _symlinked_parent(workspace, rel)
        if bad_parent:
            result.notes.append(f"{rel}: not protected, {bad_parent} is a symlink")
            continue
        if git_kind != "dir" and rel.startswith(".git/"):
            continue
        result.paths.append(ProtectedPath(rel, _kind(workspace / rel)))
    result.git_dir_mount = git_kind == "dir" and any(
        p.rel.startswith(".git/") and p.kind in ("dir", "file") for p in result.paths
    )
    return result


def device_name(rel: str) -> str:
    """`.git/hooks` -> `protect-git-hooks` (upstream's naming)."""
    slug = re.sub(r"[^a-z0-9]+", "-", rel.lower()).strip("-") or "path"
    return f"protect-{slug}"[:60]


def devices(p: ProtectionPlan, target: str) -> dict[str, dict[str, str]]:
    """Disk devices: `.git` as a mount point (rw), then each existing path read-only.

    Symlinks are not mounted (the daemon would follow them on the host); absent paths cannot
    be; both are still watched by the host-side guard.
    """
    out: dict[str, dict[str, str]] = {}
    if p.git_dir_mount:
        out["protect-git-dir"] = {
            "type": "disk",
            "source": str(p.workspace / ".git"),
            "path": f"{target}/.git",
        }
    for entry in p.paths:
        if entry.kind not in ("dir", "file"):
            continue
        name = device_name(entry.rel)
        while name in out:
            name += "-x"
        out[name] = {
            "type": "disk",
            "source": os.path.join(p.workspace, entry.rel),
            "path": f"{target}/{entry.rel}",
            "readonly": "true",
        }
    return out


def summary(p: ProtectionPlan) -> str:
    mounted = [e.rel for e in p.paths if e.kind in ("dir", "file")]
    watched = [e.rel for e in p.paths if e.kind not in ("dir", "file")]
    text = "Protected paths (mounted read-only): " + (", ".join(mounted) or "none")
    if watched:
        text += "; watched for creation or change: " + ", ".join(watched)
    return text
