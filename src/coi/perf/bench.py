"""`coi bench`: time to first command with coi, next to the daemon's own floors, same run.

Rows, interleaved round by round so that a busy machine slows all of them alike:
- `coi run -- true`, the whole command in a new process (interpreter start, config, the
  sandbox made from the image, its network proven, the command, the return);
- the cold floor: create a container from the image, start it, exec `true`, delete it,
  over REST from this (already started) process: what any client must ask the daemon;
- the warm floor: start a stopped container made from the image beforehand, exec `true`:
  what the daemon needs when nothing has to be made;
- `coi list` next to the daemon's own CLI's `list`, both new processes, with `listed`
  running containers made for it (addresses reserved, as coi makes its sandboxes); only
  where that CLI is installed and talks to the same daemon (a local one);
- `coi run -- true` taking a running spare (`sandbox.running_spares = 1`, in a workspace of
  its own, the next spare ready before each round), next to the daemon's own CLI's `exec
  CT -- true` into a running container, a new process too (where that CLI is installed).

Everything the bench makes is labelled (`user.coi.bench`) and removed at the end, on an
error and on Ctrl-C (the `coi run` children clean up their own sandboxes; what is left of
them is removed too). No timing here is a pass or fail: it reports.
"""

from __future__ import annotations

import math
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from coi import labels
from coi.backend.client import IncusClient
from coi.backend.exec import ExecRequest
from coi.errors import BackendError, CoiError, NotFound
from coi.network import address

# The label on every container the bench makes itself, its value the run's token.
BENCH_LABEL = "user.coi.bench"
# And on the containers made to be listed, which stay from the first round to the last.
_LISTED = "user.coi.bench.listed"
# How long the sandboxes of `coi run` are waited for to be gone, between rounds and at the end.
SETTLE = 60.0


@dataclass
class Row:
    """One measured thing: its samples in seconds."""

    key: str
    label: str
    samples: list[float] = field(default_factory=list)

    @property
    def p50(self) -> float:
        return statistics.median(self.samples)

    @property
    def p95(self) -> float:
        """Nearest rank: with few runs, the slowest one or close to it."""
        xs = sorted(self.samples)
        return xs[max(0, math.ceil(0.95 * len(xs)) - 1)]

    def as_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "label": self.label,
            "samples_ms": [round(x * 1000, 1) for x in self.samples],
            "p50_ms": round(self.p50 * 1000, 1),
            "p95_ms": round(self.p95 * 1000, 1),
            "min_ms": round(min(self.samples) * 1000, 1),
            "max_ms": round(max(self.samples) * 1000, 1),
        }


@dataclass
class Report:
    """What `coi bench` prints."""

    server: str
    pool: str
    driver: str
    image: str
    runs: int
    cpus: int
    load: float
    rows: list[Row]

    def row(self, key: str) -> Row:
        return next(r for r in self.rows if r.key == key)

    @property
    def ratios(self) -> dict[str, float]:
        """coi's p50 over each floor's p50."""
        coi = self.row("coi_run").p50
        out = {
            "coi_run/cold_floor": round(coi / self.row("cold_floor").p50, 2),
            "coi_run/warm_floor": round(coi / self.row("warm_floor").p50, 2),
        }
        keys = {r.key for r in self.rows}
        if {"coi_list", "daemon_list"} <= keys:
            listing = self.row("coi_list").p50 / self.row("daemon_list").p50
            out["coi_list/daemon_list"] = round(listing, 2)
        if {"coi_run_spare", "daemon_exec"} <= keys:
            spare = self.row("coi_run_spare").p50 / self.row("daemon_exec").p50
            out["coi_run_spare/daemon_exec"] = round(spare, 2)
        return out

    def as_json(self) -> dict[str, Any]:
        return {
            "server": self.server,
            "pool": self.pool,
            "pool_driver": self.driver,
            "image": self.image,
            "runs": self.runs,
            "cpus": self.cpus,
            "load_average": round(self.load, 2),
            "rows": [r.as_json() for r in self.rows],
            "ratios": self.ratios,
        }


@dataclass(frozen=True)
class Setup:
    """Where the bench runs: the image, and the pool and bridge a sandbox would use."""

    image: str
    pool: str
    network: str
    runs: int
    coi: tuple[str, ...] = (sys.executable, "-m", "coi")
    # Running containers made for the listing rows (0: no listing rows).
    listed: int = 10
    # The rows of a session taking a running spare.
    spare: bool = True


def run(client: IncusClient, setup: Setup, *, progress: Callable[[str], None]) -> Report:
    """Measure `setup.runs` rounds; remove everything made, whatever happens."""
    token = secrets.token_hex(4)
    ws = Path(tempfile.mkdtemp(prefix=f"coi-bench-{token}-"))
    home = Path(tempfile.mkdtemp(prefix=f"coi-bench-home-{token}-"))
    # The sandboxes' state (audit logs, locks) in a folder of the bench's own, removed after.
    env = {**os.environ, "COI_HOME": str(home)}
    pool = client.networks.pool(setup.pool)
    if pool is None:
        raise CoiError(f"storage pool '{setup.pool}' not found", resolution="Run 'coi setup'.")
    rows = [
        Row("coi_run", "`coi run -- true` (whole command, new sandbox from the image)"),
        Row("cold_floor", "cold floor: create from the image, start, exec `true`, delete"),
        Row("warm_floor", "warm floor: start a stopped container made beforehand, exec `true`"),
    ]
    coi_run, cold, warm = rows
    lister = _daemon_cli(client) if setup.listed else None
    if setup.listed and lister is None:
        progress(
            "no listing rows: the daemon's own command line is not installed here, "
            "or coi's daemon is not the local one"
        )
    listings: list[tuple[Row, list[str]]] = []
    # The running-spare rows: their workspace, and the daemon's exec into a running container.
    warm_ws = Path(tempfile.mkdtemp(prefix=f"coi-bench-{token}-spare-"))
    spare_row = Row("coi_run_spare", "`coi run -- true` taking a running spare")
    execs: list[tuple[Row, list[str]]] = []
    try:
        if lister is not None:
            progress(f"making {setup.listed} running containers to list...")
            _make_listed(client, setup, ws, token)
            n = setup.listed
            listings = [
                (Row("coi_list", f"`coi list` with {n} containers"), [*setup.coi, "list"]),
                (
                    Row("daemon_list", f"`{Path(lister).name} list` with {n} containers"),
                    [lister, "list", "--project", client.project or "default"],
                ),
            ]
            rows += [row for row, _ in listings]
            for _row, argv in listings:  # the page cache warmed, as for the first command
                _listing(argv, env)
        progress("warming up (the policy's bridge, the page cache)...")
        _coi_run(setup, ws, env)
        spare_env = {**env, "COI_RUNNING_SPARES": "1"}
        if setup.spare:
            rows.append(spare_row)
            _coi_run(setup, warm_ws, spare_env)  # leaves the first spare
            if lister is not None:
                target = _running(client, setup, ws, token)
                row = Row("daemon_exec", f"`{Path(lister).name} exec CT -- true`, CT running")
                argv = [lister, "exec", "--project", client.project or "default", target]
                execs.append((row, [*argv, "--", "true"]))
                rows.append(row)
                _listing(execs[0][1], env)
        for i in range(setup.runs):
            progress(f"round {i + 1}/{setup.runs}")
            _settle(client, ws, token)
            coi_run.samples.append(_timed(lambda: _coi_run(setup, ws, env)))
            _settle(client, ws, token)
            cold.samples.append(_cold_floor(client, setup, ws, token))
            warm.samples.append(_warm_floor(client, setup, ws, token))
            for row, argv in listings:
                row.samples.append(_timed(partial(_listing, argv, env)))
            if setup.spare:
                _spare_ready(client, warm_ws)
                spare_row.samples.append(_timed(lambda: _coi_run(setup, warm_ws, spare_env)))
                for row, argv in execs:
                    row.samples.append(_timed(partial(_listing, argv, env)))
    finally:
        with _no_interrupts():
            _remove(client, ws, token)
            _remove_spares(client, warm_ws)
            for d in (ws, warm_ws, home):
                shutil.rmtree(d, ignore_errors=True)
    return Report(
        server=client.server.display_name,
        pool=setup.pool,
        driver=pool.driver,
        image=setup.image,
        runs=setup.runs,
        cpus=os.cpu_count() or 0,
        load=os.getloadavg()[0],
        rows=rows,
    )


def _timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _coi_run(setup: Setup, ws: Path, env: dict[str, str]) -> None:
    argv = [*setup.coi, "run", "--image", setup.image, "-w", str(ws), "--", "true"]
    # Output to a file, not a pipe: timed until coi's process exits, as a shell waits for it.
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err
        )
        try:
            code = proc.wait()
        except KeyboardInterrupt:
            # The terminal's Ctrl-C reached the child too: let it remove its own sandbox
            # (subprocess.call would kill it after a quarter of a second, leaving that to
            # its keeper), then stop.
            with _no_interrupts():
                try:
                    proc.wait(timeout=SETTLE)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            raise
        if code != 0:
            err.seek(0)
            text = err.read().decode(errors="replace").strip()
            raise CoiError(
                f"`coi run -- true` failed with exit code {code}",
                details=text[-2000:] or None,
                resolution=f"Check that a session starts: coi run --image {setup.image} -- true",
            )


def _daemon_cli(client: IncusClient) -> str | None:
    """The daemon's own command line (`incus`, or `lxc` for LXD), where it reaches the same
    daemon: installed, and coi's daemon the local one."""
    if not client.endpoint.is_local:
        return None
    return shutil.which("incus" if client.server.kind == "incus" else "lxc")


def _make_listed(client: IncusClient, setup: Setup, ws: Path, token: str) -> None:
    """`setup.listed` running containers with coi's name prefix (so `coi list` shows them),
    each NIC with an address reserved on the bridge where it has room, as coi's sandboxes."""
    net = client.networks.get(setup.network)
    free = address.candidates(net) if net is not None else []
    for i in range(setup.listed):
        devices = _devices(setup, ws)
        del devices["workspace"]  # `_settle` waits for the workspace's sandboxes to go
        if i < len(free):
            devices["eth0"]["ipv4.address"] = free[-1 - i]  # the top: clear of sandboxes
        client.instances.create(
            _name(token, f"list{i:02d}"),
            image=setup.image,
            devices=devices,
            config={BENCH_LABEL: token, _LISTED: "true"},
            start=True,
        )


def _running(client: IncusClient, setup: Setup, ws: Path, token: str) -> str:
    """A running container for the daemon's exec row: one made for the listing, else one
    made now (labelled, removed with the rest)."""
    for inst in client.instances.list():
        if inst.config.get(_LISTED) == "true" and inst.config.get(BENCH_LABEL) == token:
            return inst.name
    name = _name(token, "exec")
    devices = _devices(setup, ws)
    del devices["workspace"]  # `_settle` waits for the workspace's sandboxes to go
    client.instances.create(
        name,
        image=setup.image,
        devices=devices,
        config={BENCH_LABEL: token, _LISTED: "true"},
        start=True,
    )
    return name


def _spare_ready(client: IncusClient, ws: Path) -> None:
    """Wait (bounded) until the spare workspace holds one ready running spare and nothing
    else: the last round's sandbox gone, the spare its coi left booted."""
    deadline = time.monotonic() + SETTLE
    while time.monotonic() < deadline:
        mine = [i for i in client.instances.list() if i.config.get(labels.WORKSPACE) == str(ws)]
        if len(mine) == 1 and mine[0].config.get(labels.SPARE_READY) == "true":
            return
        time.sleep(0.1)
    raise CoiError(
        "no running spare was made within a minute",
        resolution="Check that 'COI_RUNNING_SPARES=1 coi run -- true' leaves one ('coi list' "
        "shows it; ~/.coi/logs/spares.log says why not), or run with --no-running-spare.",
    )


def _remove_spares(client: IncusClient, ws: Path) -> None:
    """The spare workspace's sandboxes, once the spare makers its runs left have ended (they
    outlive coi: a spare made after this would be left behind)."""
    deadline = time.monotonic() + SETTLE
    while _makers(ws) and time.monotonic() < deadline:
        time.sleep(0.1)
    for inst in client.instances.list():
        if inst.config.get(labels.WORKSPACE) == str(ws):
            try:
                client.instances.delete(inst.name, force=True)
            except NotFound:
                pass


def _makers(ws: Path) -> bool:
    """Whether a process still runs with the spare workspace on its command line: a spare
    maker (`coi run` itself has returned by then)."""
    needle = str(ws).encode()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if needle in (proc / "cmdline").read_bytes():
                    return True
            except OSError:
                pass
    return False


def _listing(argv: list[str], env: dict[str, str]) -> None:
    done = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True)
    if done.returncode != 0:
        raise CoiError(
            f"`{' '.join(argv)}` failed with exit code {done.returncode}",
            details=done.stderr.decode(errors="replace").strip()[-2000:] or None,
        )


def _devices(setup: Setup, ws: Path) -> dict[str, dict[str, str]]:
    """The devices a sandbox has at least: its root, its NIC, the workspace."""
    return {
        "root": {"type": "disk", "path": "/", "pool": setup.pool},
        "eth0": {"type": "nic", "network": setup.network, "name": "eth0"},
        "workspace": {"type": "disk", "source": str(ws), "path": "/workspace"},
    }


def _name(token: str, what: str) -> str:
    return f"coi-bench-{token}-{what}"


def _cold_floor(client: IncusClient, setup: Setup, ws: Path, token: str) -> float:
    name = _name(token, "cold")
    t = time.perf_counter()
    client.instances.create(
        name,
        image=setup.image,
        devices=_devices(setup, ws),
        config={BENCH_LABEL: token},
        start=True,
    )
    client.exec.run(name, ExecRequest(["true"]))
    client.instances.delete(name, force=True)
    return time.perf_counter() - t


def _warm_floor(client: IncusClient, setup: Setup, ws: Path, token: str) -> float:
    name = _name(token, "warm")
    client.instances.create(
        name, image=setup.image, devices=_devices(setup, ws), config={BENCH_LABEL: token}
    )
    try:
        t = time.perf_counter()
        client.instances.start(name)
        client.exec.run(name, ExecRequest(["true"]))
        return time.perf_counter() - t
    finally:
        client.instances.delete(name, force=True)


def ours(client: IncusClient, ws: Path, token: str, *, listed: bool = True) -> list[str]:
    """The containers of this bench: its own (labelled) and the sandboxes of its workspace;
    `listed=False`: not those made for the listing rows."""
    return [
        inst.name
        for inst in client.instances.list()
        if (inst.config.get(BENCH_LABEL) == token or inst.config.get(labels.WORKSPACE) == str(ws))
        and (listed or inst.config.get(_LISTED) != "true")
    ]


def _settle(client: IncusClient, ws: Path, token: str) -> None:
    """Wait (bounded) until the last round's sandboxes are gone: the daemon removes them
    after coi returns, and that work would slow the next row. The listed containers stay."""
    deadline = time.monotonic() + SETTLE
    while ours(client, ws, token, listed=False) and time.monotonic() < deadline:
        time.sleep(0.1)


def _remove(client: IncusClient, ws: Path, token: str) -> None:
    """Remove everything the bench made: what is still there after the daemon's own removals
    had their time is force-deleted."""
    _settle(client, ws, token)
    for name in ours(client, ws, token):
        try:
            client.instances.delete(name, force=True)
        except NotFound:
            pass
        except BackendError:
            time.sleep(0.5)  # a removal under way: once more
            try:
                client.instances.delete(name, force=True)
            except NotFound:
                pass


@contextmanager
def _no_interrupts() -> Iterator[None]:
    """A second Ctrl-C cannot cut the cleanup short (main thread only: signals live there)."""
    try:
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
