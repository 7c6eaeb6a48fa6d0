"""Slot allocation that is safe when several coi processes start on one workspace at once."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from coi.errors import SessionError
from coi.helpers import pid_alive
from coi.locks import held
from coi.sessions.naming import MAX_SLOTS, prefix


class SlotsFull(SessionError):
    """Every slot of the workspace is held (by a container or a live coi)."""


class SlotClaims:
    """Claims on slots, kept as files under a lock so that two processes never pick one slot.

    A claim lives from allocation until the container exists (or the session ends); the
    claim of a process that died is ignored.
    """

    def __init__(self, lock_dir: Path) -> None:
        self.dir = lock_dir
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, ws_hash: str, slot: int) -> Path:
        return self.dir / f"{ws_hash}-{slot}.claim"

    def _claimed(self, ws_hash: str, slot: int) -> bool:
        p = self.path(ws_hash, slot)
        try:
            pid = int(p.read_text().strip() or "0")
        except (OSError, ValueError):
            return False
        return pid != os.getpid() and pid_alive(pid)

    def allocate(
        self,
        ws_hash: str,
        taken: Callable[[int], bool],
        *,
        start: int = 1,
        most: int = MAX_SLOTS,
    ) -> int:
        """Claim the first slot from `start` to `most` that no container and no live process
        holds."""
        with held(self.dir / f"{ws_hash}.lock"):
            # Claims of processes that died (kill -9 before their keeper ran) go first.
            for stale in stale_claims(self.dir, f"{ws_hash}-*.claim"):
                stale.unlink(missing_ok=True)
            for slot in range(start, most + 1):
                if self._claimed(ws_hash, slot) or taken(slot):
                    continue
                self.path(ws_hash, slot).write_text(f"{os.getpid()}\n")
                return slot
        raise SlotsFull(
            f"all {most} slots are in use",
            resolution="Stop a session ('coi list', 'coi kill NAME'), or allow more with "
            "[defaults] max_slots (COI_MAX_SLOTS).",
        )

    def release(self, ws_hash: str, slot: int) -> None:
        p = self.path(ws_hash, slot)
        try:
            if int(p.read_text().strip() or "0") == os.getpid():
                p.unlink()
        except (OSError, ValueError):
            pass


def stale_claims(lock_dir: Path, pattern: str = "*.claim") -> list[Path]:
    """Claim files of processes that died (kill -9) without releasing their slot."""
    out = []
    for p in sorted(lock_dir.glob(pattern)) if lock_dir.is_dir() else ():
        try:
            pid = int(p.read_text().strip() or "0")
        except (OSError, ValueError):
            pid = 0
        if not pid or not pid_alive(pid):
            out.append(p)
    return out


def claimed_containers(lock_dir: Path) -> set[str]:
    """Names of the containers whose slot a live coi process holds (being made, running or
    being removed by it): not for `coi clean` to take."""
    out = set()
    for p in sorted(lock_dir.glob("*.claim")) if lock_dir.is_dir() else ():
        ws_hash, _, slot = p.stem.rpartition("-")
        try:
            pid = int(p.read_text().strip() or "0")
        except (OSError, ValueError):
            continue
        if pid and pid_alive(pid) and slot.isdigit():
            out.add(f"{prefix()}{ws_hash}-{slot}")
    return out
