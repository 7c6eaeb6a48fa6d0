"""coi's own log of each session (`coi logs`): ~/.coi/logs/sessions/<container>.log.

One JSON object a line: `time` (UTC, ISO 8601), `event` (start, note, policy, alert, detach,
exit, end), `text` (what coi told the user), and facts of the event. Lines are appended
with O_APPEND in one write each, so several coi processes (a session, its `coi attach`, a
`coi kill`) can write at once without tearing a line. The container name is untrusted input
for a path (a command-line argument, a name the daemon lists): only a daemon-valid instance
name is accepted, so no `/` or `..` reaches the file system.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from coi.config.paths import coi_home
from coi.errors import UsageError

# The daemon's instance names: letters, digits and hyphens, not starting with a hyphen, at
# most 63 characters. Nothing else names a file: no `/`, no `.`.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,62}")
EVENTS = ("start", "note", "policy", "alert", "detach", "exit", "end")
# Events after which the session is over (`follow` stops).
FINAL = frozenset({"end"})


def check_name(name: str) -> str:
    """`name` if it can be a container's; a usage error otherwise (it names a file)."""
    if not _NAME.fullmatch(name):
        raise UsageError(
            f"'{name}' is not a container name",
            resolution="Container names are letters, digits and hyphens (see 'coi list').",
        )
    return name


def sessions_dir(home: Path | None = None) -> Path:
    return (home or coi_home()) / "logs" / "sessions"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class SessionLog:
    """The log of one container's sessions (a persistent container's go on one file)."""

    def __init__(self, container: str, home: Path | None = None) -> None:
        self.container = check_name(container)
        self.path = sessions_dir(home) / f"{container}.log"

    def write(self, event: str, text: str, **facts: Any) -> None:
        record = {"time": _now(), "event": event, "container": self.container, "text": text}
        record.update(facts)
        line = (json.dumps(record, separators=(",", ":"), default=str) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(self.path, flags, 0o600)
        try:
            os.write(fd, line)  # one write of an O_APPEND file: lines never interleave
        finally:
            os.close(fd)

    def try_write(self, event: str, text: str, **facts: Any) -> None:
        """`write`, but a log that cannot be written never stops a session."""
        try:
            self.write(event, text, **facts)
        except OSError:
            pass


def record(container: str, event: str, text: str, **facts: Any) -> None:
    """An event in `container`'s log, if it can be written (never an error: a session goes
    on without its log)."""
    try:
        SessionLog(container).try_write(event, text, **facts)
    except UsageError:
        pass


def parse(line: str) -> dict[str, Any] | None:
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


def read(path: Path) -> list[dict[str, Any]]:
    """Every record of a JSON-lines file, oldest first (a torn or foreign line skipped)."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return []
    return [r for line in text.splitlines() if (r := parse(line)) is not None]


Transform = Callable[[dict[str, Any]], "dict[str, Any] | None"]


def _same(rec: dict[str, Any]) -> dict[str, Any] | None:
    return rec


def alert_of(rec: dict[str, Any]) -> dict[str, Any] | None:
    """An audit-log event (the monitor's) as a session-log `alert`; None below a warning.

    The monitor writes its alerts to the audit log, whether a coi process attends the
    session or its detached service watches it alone; `coi logs` shows them in time order
    among coi's own events instead of writing them twice.
    """
    level = str(rec.get("level", "info"))
    if level == "info":
        return None
    action = rec.get("action")
    text = f"{level.upper()} {rec.get('title', '')}: {rec.get('description', '')}"
    if action and action != "logged":
        text += f" [{action}]"
    return {
        "time": rec.get("timestamp", ""),
        "event": "alert",
        "container": rec.get("container", ""),
        "text": text,
        "level": level,
        "category": rec.get("category", ""),
    }


def merged(sources: Sequence[tuple[Path, Transform]]) -> list[dict[str, Any]]:
    """The records of several JSON-lines files, each through its transform, in time order."""
    out = [r for path, f in sources for rec in read(path) if (r := f(rec)) is not None]
    return sorted(out, key=lambda r: str(r.get("time", "")))


def follow(
    sources: Path | Sequence[tuple[Path, Transform]],
    *,
    done: Callable[[dict[str, Any]], bool] = lambda rec: False,
    gone: Callable[[], bool] = lambda: False,
    interval: float = 0.5,
    check_every: float = 2.0,
) -> Iterator[dict[str, Any]]:
    """Records of one file (or of several, each through its transform) as they are
    appended, those already there first, like `tail -f`; what several files gave in one
    look is yielded in time order.

    Ends after a record for which `done` is true, or when `gone()` says the session is over
    and nothing more was written (asked every `check_every` seconds: it may ask the daemon).
    A file not there yet is waited for.
    """
    files = [(sources, _same)] if isinstance(sources, Path) else list(sources)
    offsets = [0] * len(files)
    partials = [b""] * len(files)
    last_check = time.monotonic()
    while True:
        batch: list[dict[str, Any]] = []
        for i, (path, transform) in enumerate(files):
            try:
                with path.open("rb") as fh:
                    fh.seek(offsets[i])
                    chunk = fh.read()
            except FileNotFoundError:
                continue
            offsets[i] += len(chunk)
            *lines, partials[i] = (partials[i] + chunk).split(b"\n")
            for raw in lines:
                rec = parse(raw.decode(errors="replace"))
                if rec is not None and (out := transform(rec)) is not None:
                    batch.append(out)
        if batch:
            for rec in sorted(batch, key=lambda r: str(r.get("time", ""))):
                yield rec
                if done(rec):
                    return
            continue
        now = time.monotonic()
        if now - last_check >= check_every:
            last_check = now
            if gone():
                return
        time.sleep(interval)


def newest_for(prefix: str, directory: Path, suffix: str) -> Path | None:
    """The most recently written `<prefix>*<suffix>` in `directory` (a workspace's logs)."""
    try:
        found = [
            p for p in directory.iterdir() if p.name.startswith(prefix) and p.name.endswith(suffix)
        ]
    except FileNotFoundError:
        return None
    return max(found, key=lambda p: p.stat().st_mtime, default=None)
