"""Responses to threats: log, alert, pause (freeze) or kill; deduplicated; audited."""

from __future__ import annotations

import time
from collections.abc import Callable

from coi.audit import AuditLog, Event
from coi.backend.client import IncusClient
from coi.errors import BackendError, NotFound
from coi.monitor.detect import CRITICAL, HIGH, INFO, RANK, WARNING, Threat

DEDUP_SECONDS = 30.0


def alert_text(event: Event, container: str, audit_path: str) -> str:
    """The reference's alert box, as shown in the user's terminal."""
    lines = [
        f"⚠ SECURITY ALERT [{event.level.upper()}]",
        event.title,
        "",
        event.description,
        "",
        f"→ Action taken: {event.action}",
        f"→ Logged to audit: {audit_path}",
    ]
    if event.action == "paused":
        lines.append(
            f"Container {container} PAUSED due to security threat. "
            f"Resume with: coi resume {container}"
        )
    elif event.action == "killed":
        lines.append(f"Container {container} KILLED due to critical security threat")
    return "\n".join(lines)


class Responder:
    """Turns threats into actions on one container, at most once per identical threat."""

    def __init__(
        self,
        client: IncusClient,
        container: str,
        audit: AuditLog,
        *,
        auto_pause: bool,
        auto_kill: bool,
        alert: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
        kill_now: Callable[[], bool] | None = None,
        freeze_now: Callable[[bool], bool] | None = None,
    ) -> None:
        self.client = client
        self.container = container
        self.audit = audit
        self.auto_pause = auto_pause
        self.auto_kill = auto_kill
        self.alert = alert
        self.clock = clock
        # Ends every process of the container at once, from the host (the cgroup's
        # cgroup.kill): the daemon's forced stop takes most of a second on a busy machine, and
        # a reverse shell must not get that second. The daemon is told afterwards.
        self.kill_now = kill_now
        # Freezes (True) or thaws (False) the container from the host and waits until it is
        # done: the daemon's own freeze polls a v1 freezer once a second (collect.cgroup_freeze).
        self.freeze_now = freeze_now
        self._stop_after = False
        self.paused = False
        self.killed = False
        self._last: dict[str, float] = {}

    def handle(self, threats: list[Threat]) -> list[Event]:
        events = []
        # Worst first: a kill makes lesser actions moot.
        for t in sorted(threats, key=lambda t: -RANK[t.level]):
            events.append(self._one(t))
        return events

    def _one(self, t: Threat) -> Event:
        now = self.clock()
        last = self._last.get(t.key)
        self._last[t.key] = now
        if last is not None and now - last < DEDUP_SECONDS:
            action = "deduplicated"
        elif t.level == INFO:
            action = "logged"
        elif t.level == WARNING:
            action = "alerted"
        elif t.level == HIGH:
            action = self._pause() if self.auto_pause else "alerted"
        elif t.level == CRITICAL:
            action = (
                self._kill()
                if self.auto_kill
                else (self._pause() if self.auto_pause else "alerted")
            )
        else:
            action = "logged"
        event = Event(t.level, t.category, t.title, t.description, t.evidence, action)
        self.audit.write(event)
        if action not in ("logged", "deduplicated", "logged (already paused)"):
            self.alert(alert_text(event, self.container, str(self.audit.path)))
        if self._stop_after:
            self._stop_after = False
            self._stop()
        return event

    def _pause(self) -> str:
        if self.killed:
            return "logged (already killed)"
        if self.paused:
            return "logged (already paused)"
        if self.freeze_now is not None:
            self.freeze_now(True)
        try:
            # Told even when frozen here: it then finds the freeze done at once, and shows the
            # container as frozen, which `coi resume` needs.
            self.client.instances.freeze(self.container)
        except BackendError as err:
            if self.freeze_now is not None:
                # A pause the daemon does not know of, no one could undo (a freeze that did
                # not finish in time included; a thaw of a thawed cgroup changes nothing).
                self.freeze_now(False)
            return f"pause failed: {err}"
        self.paused = True
        return "paused"

    def _kill(self) -> str:
        if self.killed:
            return "logged (already killed)"
        # Set first: the session sees its command die while the stop is still under way.
        self.killed = True
        if self.kill_now is not None and self.kill_now():
            # Every process is gone now; the daemon's stop (which also tidies up) follows the
            # audit event, so the event says when the kill happened.
            self._stop_after = True
            return "killed"
        try:
            self.client.instances.stop(self.container, force=True)
        except NotFound:
            pass
        except BackendError as err:
            self.killed = False
            return f"kill failed: {err}"
        return "killed"

    def _stop(self) -> None:
        """The daemon's forced stop after a host-side kill: the container's init is dead
        already, so "not running" or "gone" is the expected answer."""
        try:
            self.client.instances.stop(self.container, force=True)
        except (NotFound, BackendError):
            pass
