"""Append security events to ~/.coi/audit/<container>.jsonl in the reference's compact format."""

from __future__ import annotations

import fcntl
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from coi.config.paths import coi_home

LEVELS = ("info", "warning", "high", "critical")


def audit_dir(home: Path | None = None) -> Path:
    return (home or coi_home()) / "audit"


@dataclass
class Event:
    """One threat or protection event (the reference's `ThreatEvent`)."""

    level: str
    category: str
    title: str
    description: str
    evidence: dict[str, Any] = field(default_factory=dict)
    action: str = "logged"
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    timestamp: str = field(
        default_factory=lambda: datetime.now(UTC).isoformat(timespec="milliseconds")
    )

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "timestamp": self.timestamp,
            "level": self.level,
            "category": self.category,
            "title": self.title,
            "description": self.description,
            "evidence": self.evidence,
            "action": self.action,
        }


def _line(record: dict[str, Any]) -> bytes:
    # No spaces after separators: `grep '"level":"critical"'` must work on the file.
    return (json.dumps(record, separators=(",", ":"), default=str) + "\n").encode()


class AuditLog:
    """The audit file of one container; appends are atomic lines, safe across processes."""

    def __init__(self, container: str, home: Path | None = None) -> None:
        self.container = container
        self.path = audit_dir(home) / f"{container}.jsonl"

    def write(self, event: Event) -> None:
        self.append({"container": self.container, **event.as_dict()})

    def append(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            # One write per line under a lock: monitor, guard and CLI may write at once.
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, _line(record))
        finally:
            os.close(fd)

    def read(self) -> list[dict[str, Any]]:
        """Every record, oldest first; lines that are not JSON objects are skipped."""
        try:
            lines = self.path.read_text().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
        return out


def prune(retention_days: int, home: Path | None = None, now: float | None = None) -> list[Path]:
    """Delete audit files not written for `retention_days` (0 keeps everything)."""
    if retention_days <= 0:
        return []
    cutoff = (now or time.time()) - retention_days * 86400
    removed = []
    for path in audit_dir(home).glob("*.jsonl"):
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
                removed.append(path)
        except FileNotFoundError:
            continue
    return removed
