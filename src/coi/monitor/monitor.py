"""The monitor loop: sweep, detect, respond, every `poll_interval_sec`, in a thread of coi."""

from __future__ import annotations

import ipaddress
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coi import labels
from coi.audit import AuditLog, Event, prune
from coi.backend.client import IncusClient
from coi.config.loader import Config
from coi.config.schema import BY_KEY
from coi.errors import BackendError, NotFound
from coi.monitor import detect, execwatch, fanwatch, flows, netguard, storms, taskstats
from coi.monitor.collect import (
    Collector,
    Conn,
    Proc,
    Sweep,
    cgroup_dir,
    cgroup_freeze,
    cgroup_kill,
    cgroup_name,
    read_fds,
)
from coi.monitor.detect import NetContext, Threat
from coi.monitor.respond import Responder
from coi.monitor.traffic import TrafficJudge

Log = Callable[[str], None]

# The longest gap between two looks, whatever poll_interval_sec says: what the kernel reports
# by events (execs, exits, forks, blocked packets) needs no sweep, the rest is sampled.
MAX_INTERVAL = 0.5
# I/O volumes are judged over the sweeps of the last two seconds (the sweep period before the
# 0.5 s cap, so file_*_threshold_mb means what it did), rates over one second at least (a
# build's reads come in bursts that half a second would make look like 100 MB/s).
IO_WINDOW = 2.0
IO_RATE_SPAN = 1.0
# The shortest gap between two looks a new connection asks for (a burst of connections is
# looked at twice: at its first and after its last).
FLOW_GAP = 0.05


def _default(key: str) -> Any:
    return BY_KEY[key].default


@dataclass
class Settings:
    """`[monitoring]` as the monitor uses it."""

    # The defaults are the schema's, declared once there (they had drifted apart here).
    enabled: bool = _default("monitoring.enabled")
    interval: float = min(MAX_INTERVAL, float(_default("monitoring.poll_interval_sec")))
    auto_pause: bool = _default("monitoring.auto_pause_on_high")
    auto_kill: bool = _default("monitoring.auto_kill_on_critical")
    read_mb: float = _default("monitoring.file_read_threshold_mb")
    read_rate: float = _default("monitoring.file_read_rate_mb_per_sec")
    write_mb: float = _default("monitoring.file_write_threshold_mb")
    write_rate: float = _default("monitoring.file_write_rate_mb_per_sec")
    dns_threshold: int = _default("monitoring.nft.dns_query_threshold")
    exec_rate: int = _default("monitoring.nft.rate_limit_per_second")
    # Use the kernel's exec and exit events when root (off: /proc sweeps only).
    kernel_events: bool = True
    retention_days: int = _default("monitoring.audit_log_retention_days")
    exfil_mb: float = _default("monitoring.exfil_threshold_mb")
    exfil_total_mb: float = _default("monitoring.exfil_total_mb")
    workspace: str = "/workspace"
    net: NetContext = field(default_factory=NetContext)

    @classmethod
    def from_config(cls, cfg: Config, workspace: str = "/workspace") -> Settings:
        return cls(
            enabled=cfg.get_bool("monitoring.enabled"),
            interval=min(
                MAX_INTERVAL, max(0.2, float(cfg.get_int("monitoring.poll_interval_sec")))
            ),
            auto_pause=cfg.get_bool("monitoring.auto_pause_on_high"),
            auto_kill=cfg.get_bool("monitoring.auto_kill_on_critical"),
            read_mb=cfg.get_float("monitoring.file_read_threshold_mb"),
            read_rate=cfg.get_float("monitoring.file_read_rate_mb_per_sec"),
            write_mb=cfg.get_float("monitoring.file_write_threshold_mb"),
            write_rate=cfg.get_float("monitoring.file_write_rate_mb_per_sec"),
            dns_threshold=cfg.get_int("monitoring.nft.dns_query_threshold"),
            exec_rate=cfg.get_int("monitoring.nft.rate_limit_per_second"),
            retention_days=cfg.get_int("monitoring.audit_log_retention_days"),
            exfil_mb=cfg.get_float("monitoring.exfil_threshold_mb"),
            exfil_total_mb=cfg.get_float("monitoring.exfil_total_mb"),
            workspace=workspace,
        )


def threats_of(sweep: Sweep, s: Settings, io: tuple[int, int, float] | None = None) -> list[Threat]:
    """Every detector over one sweep (no side effects). `io`: bytes read and written over a
    window of sweeps and its length (None: this sweep's own)."""
    found = detect.scan_processes(sweep.new_processes, s.workspace)
    # Every process, not only new ones: a program may move its stdio onto a socket later.
    found += detect.socket_shells(sweep.processes, sweep.connections)
    found += detect.pipe_shells(sweep.processes, sweep.connections)
    for c in sweep.new_connections:
        if t := detect.suspicious_connection(c, s.net):
            found.append(t)
    dns = [c for c in sweep.new_connections if c.remote_port == 53]
    if t := detect.dns_volume(dns, len(dns) * 60 / sweep.interval, s.dns_threshold):
        found.append(t)
    read, write, span = (
        io if io is not None else (sweep.read_bytes, sweep.write_bytes, sweep.interval)
    )
    found += detect.io_burst(
        read,
        write,
        span,
        read_mb=s.read_mb,
        read_rate=s.read_rate,
        write_mb=s.write_mb,
        write_rate=s.write_rate,
    )
    # The rate over a second at least: the last look may come milliseconds after a sweep.
    spawned, span = len(sweep.new_processes), max(sweep.interval, IO_RATE_SPAN)
    if t := detect.fork_bomb(len(sweep.processes), spawned, span):
        found.append(t)
    if sweep.tmp and (t := detect.tmp_usage(*sweep.tmp)):
        found.append(t)
    return found


class Monitor:
    """Watches one container until stopped, the container goes away, or it kills it."""

    def __init__(
        self, client: IncusClient, container: str, settings: Settings, *, alert: Log
    ) -> None:
        self.client = client
        self.container = container
        self.settings = settings
        self.audit = AuditLog(container)
        self.responder = Responder(
            client,
            container,
            self.audit,
            auto_pause=settings.auto_pause,
            auto_kill=settings.auto_kill,
            alert=alert,
            kill_now=self._kill_now,
            freeze_now=self._freeze_now,
        )
        self.alert = alert
        self.events: list[Event] = []
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._collector: Collector | None = None
        self._lock = threading.Lock()
        self._sweep_lock = threading.Lock()  # the loop and a suspicious flow may both sweep
        self._exec: execwatch.ExecWatcher | None = None
        self._exits: taskstats.ExitWatcher | None = None
        self._flows: flows.FlowWatcher | None = None
        self._storms: storms.StormWatcher | None = None
        self._opens: fanwatch.OpenWatcher | None = None
        self._ip = ""  # the container's address, read with its state at attach time
        self._veth = ""  # its NIC's host side (where the netguard table hooks)
        self._guard: netguard.NetGuard | None = None
        self._traffic: TrafficJudge | None = None
        self._net_lock = threading.Lock()
        self._flow_lock = threading.Lock()
        self._flow_at = -1e9
        self._flow_pending = False
        # (seconds, bytes read, bytes written) of the sweeps of the last IO_WINDOW seconds.
        self._io: deque[tuple[float, int, int]] = deque()
        self._rebase = False  # the next sweep is a new baseline (after a resume)

    def _attach(self) -> Collector | None:
        cgdir = cgroup_dir(self.client.project, self.container)
        state = self.client.instances.state(self.container)
        self._ip = state.ipv4() or ""
        nic = (state.raw.get("network") or {}).get("eth0") or {}
        self._veth = str(nic.get("host_name") or "")
        if cgdir is None or not state.pid:
            return None
        return Collector(cgdir, state.pid)

    def _cgdir(self) -> Path | None:
        if self._collector is not None:
            return self._collector.cgdir
        return cgroup_dir(self.client.project, self.container)

    def _kill_now(self) -> bool:
        """Every process of the container killed from the host, at once (see Responder)."""
        cgdir = self._cgdir()
        return cgdir is not None and cgroup_kill(cgdir)

    def _freeze_now(self, freeze: bool) -> bool:
        """The container frozen (thawed) from the host, waiting until done (see Responder)."""
        cgdir = self._cgdir()
        return cgdir is not None and cgroup_freeze(cgdir, thaw=not freeze)

    def sweep_once(self, *, fresh: bool = False) -> list[Event]:
        with self._sweep_lock:
            if self._collector is None:
                self._collector = self._attach()
                if self._collector is None:
                    return []
                self._collector.sweep()  # what runs already is the baseline, not news
                return []
            if self._rebase:
                # Just resumed after review: the I/O counted since the last sweep happened
                # before the pause (the burst that paused it, and the freeze's span with it),
                # reviewed already; counting starts again from here.
                self._rebase = False
                self._collector.sweep()
                return []
            sweep = self._collector.sweep(fresh=fresh)
            io = self._io_window(sweep)
            found = threats_of(sweep, self.settings, io)
            if any(t.category == "filesystem" and "burst" in t.title for t in found):
                self._io.clear()
        return self._respond(found)

    def _io_window(self, sweep: Sweep) -> tuple[int, int, float]:
        """Bytes read and written over the last IO_WINDOW seconds of sweeps, and the span
        (at least IO_RATE_SPAN: a burst shorter than that is judged as if spread over it).
        A window that raised is emptied, so one burst is reported once."""
        hist = self._io
        hist.append((sweep.interval, sweep.read_bytes, sweep.write_bytes))
        while len(hist) > 1 and sum(h[0] for h in hist) - hist[0][0] >= IO_WINDOW:
            hist.popleft()
        span = max(sum(h[0] for h in hist), IO_RATE_SPAN)
        return (sum(h[1] for h in hist), sum(h[2] for h in hist), span)

    def _respond(self, threats: list[Threat]) -> list[Event]:
        if not threats:
            return []
        with self._lock:  # the exec watcher and the sweep may find things at once
            events = self.responder.handle(threats)
            self.events += events
        return events

    def _on_exec(self, proc: Proc) -> None:
        if self._collector is not None:
            self._collector.note_exec(proc)
        if self.responder.killed:
            return
        # Its fds first: a program born with a key file or a socket for stdio (`x < key`,
        # `x -i >& /dev/tcp/...`) is judged on them now, not at the next sweep.
        read_fds(proc, Path(f"/proc/{proc.pid}"))
        self._respond(detect.scan_processes([proc], self.settings.workspace))
        if not self.responder.killed and any(t.startswith("socket:") for t in proc.stdio.values()):
            try:
                self.sweep_once(fresh=True)
            except (BackendError, OSError):
                pass

    def _on_open(self, proc: Proc, path: str) -> None:
        if not self.responder.killed and (
            t := detect.credential_access(proc, self.settings.workspace)
        ):
            self._respond([t])

    def _on_flow(self, conn: Conn) -> None:
        if self.responder.killed:
            return
        threat = detect.suspicious_connection(conn, self.settings.net)
        if threat is None:
            # Any new connection may be the moment a shell gets its network end (`nc a | sh |
            # nc b` on 443, nothing suspicious about the flow): look at once rather than at the
            # next sweep; at most one look every FLOW_GAP seconds, the last flow of a burst
            # always looked after (a pipeline's second nc connects a millisecond later).
            self._flow_look()
            return
        # The process behind a connection says more than the connection (a reverse shell,
        # not only a port): look at the processes first, and they may be what is acted on.
        try:
            self.sweep_once(fresh=True)
        except (BackendError, OSError):
            pass
        if not self.responder.killed:
            self._respond([threat])

    def _flow_look(self) -> None:
        with self._flow_lock:
            wait = self._flow_at + FLOW_GAP - time.monotonic()
            if wait > 0:
                if not self._flow_pending:
                    self._flow_pending = True
                    timer = threading.Timer(wait, self._flow_look_now)
                    timer.daemon = True
                    timer.start()
                return
            self._flow_at = time.monotonic()
        self._flow_look_now(timed=False)

    def _flow_look_now(self, timed: bool = True) -> None:
        if timed:
            with self._flow_lock:
                self._flow_pending = False
                self._flow_at = time.monotonic()
        if self.responder.killed or self._stop.is_set() or self.responder.paused:
            return
        try:
            self.sweep_once(fresh=True)
        except (BackendError, OSError):
            pass

    def _on_storm(self, threat: Threat) -> None:
        if not self.responder.killed and not self.responder.paused:
            self._respond([threat])

    def _on_packet(self, p: netguard.Packet) -> None:
        """A packet the sandbox's nft table logged: over a cap, refused, or a DNS query."""
        if self.responder.killed or self._traffic is None:
            return
        with self._net_lock:
            found = self._traffic.judge(p, time.monotonic())
        if found and not self.responder.killed:
            self._respond(found)

    def _cap_bytes(self) -> int:
        return int(self.settings.exfil_mb * 1e6)

    def _start_guard(self) -> None:
        """The sandbox's nft table (root): exfiltration capped, refusals and DNS reported."""
        if not self._veth or not netguard.available():
            return
        net = self.settings.net
        blocked: list[str] = []
        if net.mode != "open":
            if not net.allow_private:
                blocked += [str(n) for n in detect._PRIVATE]
            blocked.append(str(detect.METADATA.supernet(new_prefix=16)))
            if net.gateway:
                blocked.append(f"{net.gateway}/32")
        allowed = [str(n) for n in net.allowed] if net.mode == "allowlist" else None
        total = int(self.settings.exfil_total_mb * 1e6)
        self._traffic = TrafficJudge(
            net, cap_bytes=self._cap_bytes(), dns_threshold=self.settings.dns_threshold,
            total_bytes=total,
        )  # fmt: skip
        try:
            self._guard = netguard.NetGuard(
                self.container, self._veth, self._on_packet, cap_bytes=self._cap_bytes(),
                gateway=net.gateway, blocked=blocked, allowed=allowed, total_bytes=total,
            )  # fmt: skip
            self._guard.start()
        except OSError as err:
            self._guard = None
            self.alert(f"Warning: the monitor's network table is unavailable ({err})")

    def _on_fork(self, parent: int, child: int) -> None:
        if self._collector is not None:
            self._collector.note_fork(parent, child)

    def _on_exit(self, ex: taskstats.Exit) -> None:
        if self._collector is not None:
            self._collector.note_exit(ex.pid, ex.read_bytes, ex.write_bytes)

    def _loop(self) -> None:
        failures = 0
        while not self._stop.wait(min(self.settings.interval, MAX_INTERVAL)):
            if self.responder.killed:
                return
            try:
                if self.responder.paused and self._still_frozen():
                    continue  # paused for review: nothing runs, nothing to see
                if self._collector is not None and not self._collector.cgdir.exists():
                    return  # stopped or removed: its cgroup went with it
                self.sweep_once()
                failures = 0
            except NotFound:
                return
            except (BackendError, OSError) as err:
                failures += 1
                if failures == 3:
                    self.alert(f"Warning: security monitor cannot read {self.container}: {err}")

    def last_look(self) -> None:
        """One more full sweep before the monitor stops (and the container goes): what a
        command shorter than the sweep interval did, a 300 MB read in a second, say, is
        otherwise never looked at."""
        if self.responder.killed or self._collector is None:
            return
        if self._exits is not None:
            time.sleep(0.2)  # the kernel reports the last exits' I/O a moment after they end
        try:
            self.sweep_once()
        except (BackendError, OSError):
            pass  # gone already: nothing more to see

    def _still_frozen(self) -> bool:
        """Asked of the daemon only after a pause: `coi resume` may have thawed it since."""
        if self.client.instances.get(self.container).status == "Frozen":
            return True
        self.responder.paused = False
        # What the user resumed it with is reviewed: the burst that paused it must not pause
        # it again from the I/O window, nor from what was read between the last sweep and
        # the pause (counted at the next sweep, over a span that includes the pause).
        self._io.clear()
        self._rebase = True
        if self._guard is not None:
            # Resumed after review: every destination may take its whole cap again (and is
            # paused again should it take that too).
            self._guard.reset_quota()
            if self._traffic is not None:
                self._traffic.resumed()
        return False

    def start(self) -> None:
        prune(self.settings.retention_days)
        self.audit.write(
            Event(
                "info",
                "monitor",
                "Monitoring started",
                f"every {self.settings.interval:g} s, from the host",
                action="logged",
            )
        )
        try:
            self.sweep_once()  # baseline
        except (BackendError, OSError):
            pass
        if self.settings.kernel_events and execwatch.available():
            # Root: see every exec the moment it happens, and the I/O of every exit.
            marker = f"lxc.payload.{cgroup_name(self.client.project, self.container)}"
            try:
                self._exec = execwatch.ExecWatcher(
                    marker, self._on_exec, per_second=self.settings.exec_rate,
                    on_fork=self._on_fork,
                )  # fmt: skip
                self._exec.start()
                self._exits = taskstats.ExitWatcher(self._on_exit)
                self._exits.start()
            except OSError as err:
                self.alert(f"Warning: kernel process events unavailable ({err}); polling only")
            if self._ip and flows.available():
                self._flows = flows.FlowWatcher(self._ip, self._on_flow)
                self._flows.start()
            if self._collector is not None and fanwatch.available():
                # Every credential-shaped file opened, as it is opened (a 1 ms read included).
                try:
                    self._opens = fanwatch.OpenWatcher(
                        self._collector.init_pid, self._on_open,
                        lambda pid: execwatch.pid_inside(pid, marker),
                    )  # fmt: skip
                    self._opens.start()
                except OSError as err:
                    self.alert(f"Warning: file open events unavailable ({err}); sweeps only")
            self._start_guard()
        if self._collector is not None:
            # The pids cgroup's counters: a fork bomb within a fifth of a second.
            self._storms = storms.StormWatcher(self._collector.cgdir, self._on_storm)
            self._storms.start()
        self._thread = threading.Thread(target=self._loop, name="coi-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop watching. The network table stays while the sandbox's NIC is there (see
        `NetGuard.stop`)."""
        self.last_look()
        if self._guard is not None:
            self._guard.stop()
        watchers = (self._exec, self._exits, self._flows, self._storms, self._opens)
        for watcher in watchers:
            if watcher:
                watcher.stop()
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)
        # A response a watcher's thread has under way (a kill, then its audit event) ends
        # before coi goes on to exit: those threads are daemon threads, and the event was
        # once lost when the killed command's end reached coi before the kill returned.
        if self._lock.acquire(timeout=30):
            self._lock.release()


def net_context(mode: str, gateway: str, allow_private: bool, allowed: list[str]) -> NetContext:
    nets = []
    for cidr in allowed:
        try:
            nets.append(ipaddress.ip_network(cidr, strict=False))
        except ValueError:
            continue
    return NetContext(mode=mode, gateway=gateway, allow_private=allow_private, allowed=nets)


@contextmanager
def monitoring(
    client: IncusClient,
    container: str,
    settings: Settings | None,
    alert: Log,
) -> Iterator[Monitor | None]:
    """Run the monitor while the block runs (no-op when monitoring is off)."""
    if settings is None or not settings.enabled or not container:
        yield None
        return
    mon = Monitor(client, container, settings, alert=alert)
    mon.start()
    try:
        yield mon
    finally:
        mon.stop()


def context_of(client: IncusClient, container: str) -> NetContext:
    """The network context of an existing container (for `coi attach`), from its bridge."""
    inst = client.instances.get(container)
    network = (inst.expanded_devices.get("eth0") or {}).get("network", "")
    net = client.networks.get(network) if network else None
    if net is None:
        return NetContext(mode="open")
    mode = net.config.get(labels.NETWORK_MODE, "open")
    gateway = str(ipaddress.IPv4Interface(net.config.get("ipv4.address", "0.0.0.0/0")).ip)
    if mode == "allowlist":
        # The allowlist's addresses, as the bridge's ACL holds them now (its allow rules);
        # without an ACL to read, judge as restricted.
        acl = client.networks.acl(network)
        if acl is None:
            return net_context("restricted", gateway, False, [])
        allowed = [
            d.strip()
            for rule in acl.egress
            if rule.get("action") == "allow"
            for d in str(rule.get("destination", "")).split(",")
            if d.strip()
        ]
        return net_context("allowlist", gateway, False, allowed)
    return net_context(mode, gateway, mode == "open", [])
