"""Secret masking: workspace files matching `security.secret_patterns` read as empty inside.

When the sandbox is made, coi looks through the workspace on the host for paths matching the
patterns and mounts, read-only, an empty file over each matching file and an empty folder over
each matching folder (disk devices `mask-*`, sources under `~/.coi/mask/`). The rest of the
workspace stays the live bind mount. The host files are never touched.

What is not masked (docs/security.md): a matching file created or renamed after the sandbox
was made, a match that is a symbolic link (its target, if it is in the workspace under another
name, is not), what sits inside `.git` (history may hold the secret), and a mask that root
inside the container unmounts (the agent user cannot; `sudo umount` can, as for protected
paths).
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from coi.errors import ConfigError

# More matches than this is refused: each is a device of the container.
MAX_MASKS = 256
# Entries looked at in the workspace before giving up on the rest (said in a note).
MAX_ENTRIES = 200_000
# Never descended into: history and packed objects are not files the patterns mean.
SKIP_DIRS = frozenset({".git"})


@dataclass(frozen=True)
class Masked:
    rel: str
    kind: str  # "file" or "dir"


@dataclass
class MaskPlan:
    """What to mask in one workspace."""

    workspace: Path
    paths: list[Masked] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Pattern:
    text: str
    parts: tuple[str, ...]  # components; empty for a bare name pattern
    name: str  # a bare name pattern (matches at any depth)
    whole_dir: bool  # `DIR/**`


def _compile(raw: str) -> _Pattern:
    text = raw.strip()
    anchored = text.startswith("/")
    text = text.lstrip("/")
    if not text or text.startswith("../") or "/../" in f"/{text}/":
        raise ConfigError(
            f"security.secret_patterns: {raw!r} is not a pattern inside the workspace",
            resolution="Use names (`*.pem`) or paths from the workspace root (`secrets/**`).",
        )
    any_depth = text.startswith("**/")
    if any_depth:
        text = text[3:]
    whole = text.endswith("/**")
    if whole:
        text = text[:-3]
    text = text.rstrip("/")
    # As in .gitignore: a pattern with a `/` (`secrets/**`, `config/*.key`) is anchored at
    # the workspace root; a bare name (`*.pem`), or one after `**/`, matches at any depth.
    if "/" not in text and (any_depth or not (anchored or whole)):
        return _Pattern(raw, (), text, whole)
    return _Pattern(raw, tuple(text.split("/")), "", whole)


def _matches(p: _Pattern, rel: str, is_dir: bool) -> bool:
    if p.whole_dir and not is_dir:
        return False
    if not p.parts:
        return fnmatch.fnmatchcase(rel.rsplit("/", 1)[-1], p.name)
    parts = rel.split("/")
    return len(parts) == len(p.parts) and all(
        fnmatch.fnmatchcase(a, b) for a, b in zip(parts, p.parts, strict=True)
    )


def _union(patterns: list[str]) -> re.Pattern[str] | None:
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))


def plan_masks(workspace: Path, patterns: list[str]) -> MaskPlan:
    """Find what the patterns match in `workspace` now (no link followed, `.git` skipped).

    :raises ConfigError: a pattern leaves the workspace, or more than MAX_MASKS paths match.
    """
    compiled = [_compile(p) for p in patterns]
    result = MaskPlan(workspace)
    if not compiled:
        return result
    # One regular expression for the name patterns (most of them): a walk over a big tree
    # spends its time matching.
    any_name = _union([p.name for p in compiled if not p.parts and not p.whole_dir])
    dir_name = _union([p.name for p in compiled if not p.parts and p.whole_dir])
    anchored = [p for p in compiled if p.parts]
    seen = 0
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        try:
            with os.scandir(workspace / rel_dir if rel_dir else workspace) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as err:
            result.notes.append(f"{rel_dir or '.'}: not searched for secrets ({err.strerror})")
            continue
        for entry in entries:
            seen += 1
            if seen > MAX_ENTRIES:
                result.notes.append(
                    f"secret masking looked at {MAX_ENTRIES} entries and stopped: the rest of "
                    "the workspace is not masked"
                )
                return _checked(result)
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            try:
                # From the directory entry's type: no stat per file (a big tree stays fast).
                is_link = entry.is_symlink()
                is_dir = not is_link and entry.is_dir(follow_symlinks=False)
                is_file = not is_link and not is_dir and entry.is_file(follow_symlinks=False)
            except OSError:
                continue
            hit = (
                (any_name is not None and any_name.match(entry.name) is not None)
                or (is_dir and dir_name is not None and dir_name.match(entry.name) is not None)
                or any(_matches(p, rel, is_dir) for p in anchored)
            )
            if hit:
                if is_link:
                    result.notes.append(f"{rel}: not masked, it is a symbolic link")
                elif is_dir:
                    result.paths.append(Masked(rel, "dir"))
                    continue  # all of it is hidden: nothing below needs a mask
                elif is_file:
                    result.paths.append(Masked(rel, "file"))
            if is_dir and entry.name not in SKIP_DIRS:
                stack.append(rel)
    return _checked(result)


def _checked(result: MaskPlan) -> MaskPlan:
    if len(result.paths) > MAX_MASKS:
        raise ConfigError(
            f"{len(result.paths)} workspace paths match security.secret_patterns "
            f"(at most {MAX_MASKS} can be masked)",
            details=", ".join(m.rel for m in result.paths[:10]) + ", ...",
            resolution="Narrow security.secret_patterns, or mask a folder with `DIR/**`.",
        )
    result.paths.sort(key=lambda m: m.rel)
    return result


def sources(home: Path) -> tuple[Path, Path]:
    """The empty file and the empty folder mounted over matches (made once, read-only)."""
    base = home / "mask"
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    empty_file, empty_dir = base / "empty", base / "empty.d"
    if not empty_file.is_file() or empty_file.stat().st_size:
        tmp = base / f".empty.{os.getpid()}"
        tmp.write_bytes(b"")
        os.replace(tmp, empty_file)
    empty_dir.mkdir(exist_ok=True)
    os.chmod(empty_file, 0o444)
    os.chmod(empty_dir, 0o555)
    return empty_file, empty_dir


def device_name(rel: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", rel.lower()).strip("-") or "path"
    return f"mask-{slug}"[:56]


def devices(p: MaskPlan, target: str, home: Path) -> dict[str, dict[str, str]]:
    """Disk devices: an empty file or folder, read-only, over each match."""
    if not p.paths:
        return {}
    empty_file, empty_dir = sources(home)
    out: dict[str, dict[str, str]] = {}
    for m in p.paths:
        name = device_name(m.rel)
        n = 1
        while name in out:
            n += 1
            name = f"{device_name(m.rel)[:52]}-{n}"
        out[name] = {
            "type": "disk",
            "source": str(empty_dir if m.kind == "dir" else empty_file),
            "path": f"{target}/{m.rel}",
            "readonly": "true",
        }
    return out


def summary(p: MaskPlan) -> str:
    shown = [f"{m.rel}/" if m.kind == "dir" else m.rel for m in p.paths]
    return "Secrets masked (read as empty inside): " + (", ".join(shown) or "none found")
