"""Saved sessions: ~/.coi/sessions-<tool>/<id>/ with metadata.json and the tool's state."""

from __future__ import annotations

import json
import shutil
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from coi.backend.intake import sanitize_tree
from coi.errors import SessionError
from coi.fsio import sync_dir, write_atomic
from coi.sessions.naming import parse_name, workspace_hash


def new_session_id() -> str:
    return str(uuid.uuid4())


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class Metadata:
    """What `metadata.json` records (upstream's keys, one per line)."""

    session_id: str
    container_name: str
    persistent: bool
    workspace: str
    saved_at: str
    tool: str = ""


def read_metadata(session_dir: Path) -> Metadata | None:
    """A session directory's metadata; None when missing or unreadable."""
    try:
        data = json.loads((session_dir / "metadata.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    fields = Metadata.__dataclass_fields__
    try:
        return Metadata(**{k: v for k, v in data.items() if k in fields})
    except TypeError:  # a required key is missing
        return None


def _write_json(path: Path, data: object) -> None:
    """Pretty-printed, one key per line (upstream's parser is line-based), written atomically."""
    write_atomic(path, json.dumps(data, indent=2) + "\n", mode=0o644)


def update_metadata(session_dir: Path, **changes: object) -> None:
    """Change some keys of a session's metadata, keeping every other key as it is."""
    path = session_dir / "metadata.json"
    _write_json(path, {**json.loads(path.read_text()), **changes})


class SessionStore:
    """The sessions of one tool."""

    def __init__(self, home: Path, tool: str) -> None:
        self.root = home / f"sessions-{tool}"
        self.tool = tool

    def dir(self, session_id: str) -> Path:
        return self.root / session_id

    def write_metadata(self, meta: Metadata) -> None:
        d = self.dir(meta.session_id)
        d.mkdir(parents=True, exist_ok=True)
        _write_json(d / "metadata.json", asdict(meta))

    def read_metadata(self, session_id: str) -> Metadata | None:
        return read_metadata(self.dir(session_id))

    def all(self) -> list[Metadata]:
        if not self.root.is_dir():
            return []
        out = []
        for d in self.root.iterdir():
            meta = self.read_metadata(d.name) if d.is_dir() else None
            if meta:
                out.append(meta)
        return sorted(out, key=lambda m: m.saved_at)

    def latest_for_workspace(self, workspace: str) -> Metadata | None:
        """The most recently saved session of this workspace only (never another's)."""
        ws_hash = workspace_hash(workspace)
        mine = []
        for m in self.all():
            parsed = parse_name(m.container_name)
            same = m.workspace == workspace or (
                parsed is not None and parsed[0] == ws_hash and not m.workspace
            )
            if same:
                mine.append(m)
        return mine[-1] if mine else None

    def resolve_resume(self, resume: str, workspace: str) -> Metadata:
        """`--resume` (auto) or `--resume=ID` -> the session to continue.

        :raises SessionError: nothing to resume, or no such session.
        """
        if resume == "auto":
            meta = self.latest_for_workspace(workspace)
            if meta is None:
                raise SessionError(
                    "no previous session to resume for this workspace: no saved sessions "
                    f"found for workspace {workspace}",
                    resolution="Start a new session without --resume.",
                )
            return meta
        meta = self.read_metadata(resume)
        if meta is None:
            raise SessionError(
                f"session '{resume}' not found - check available sessions with: coi list --all"
            )
        return meta

    def state_path(self, session_id: str, state_dir: str) -> Path:
        target = self.dir(session_id) / state_dir
        recover(target)
        return target

    def replace_state(self, session_id: str, state_dir: str, fresh: Path) -> list[str]:
        """Swap in a freshly pulled state directory; warnings for what was left out of it."""
        return swap_in(self.dir(session_id) / state_dir, fresh)


def swap_in(target: Path, fresh: Path) -> list[str]:
    """Put the freshly pulled state directory `fresh` at `target` (same filesystem, so each
    step is a rename); warnings for what was left out of it. A coi killed between the two
    renames leaves the previous save at `<target>.old`, which `recover` puts back.

    Only plain files and directories are kept, without setuid/setgid/sticky/world-writable
    bits: a pull leaves out the rest already, this also cleans state carried over from a
    copy of an older save (see `coi.backend.intake`).
    """
    warnings = sanitize_tree(fresh).warnings()
    recover(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    old = target.with_name(target.name + ".old")
    if target.exists():
        target.rename(old)
    try:
        fresh.rename(target)
    except OSError as err:
        if old.exists():
            old.rename(target)
        raise SessionError(f"could not save session data: {err}") from err
    sync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)
    return warnings


def recover(target: Path) -> None:
    """Finish a swap a killed coi left half done: the previous save back in place when the
    new one never arrived, or the previous one removed when it did."""
    old = target.with_name(target.name + ".old")
    if not old.is_dir() or old.is_symlink():
        return
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
    else:
        try:
            old.rename(target)
        except OSError:
            pass
