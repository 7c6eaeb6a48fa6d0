"""The credential broker's cost: added latency per request and memory, same machine, same run.

    sudo .venv/bin/python bench/broker.py [--requests 200] [--runs 3]

The provider is the tests' stand-in (tests/credkit.py): HTTPS with a throw-away CA at an
address in 203.0.113.0/24 inside a network namespace this script makes (nothing else is
sent anywhere). Rows, each the median per request over --requests requests, [min..max] of
the --runs runs' medians:
- direct: this process to the stand-in (httpx, keep-alive TLS), the floor;
- broker: this process to the broker's unix socket (httpx, keep-alive), which forwards to
  the stand-in: the difference to direct is what the broker adds;
- sandbox: from inside a coi-tiny container, through the proxy device, one busybox wget per
  request (a new process and connection each time, as short-lived tools do), forwarded;
- sandbox, refused: the same with a wrong placeholder: the sandbox-to-broker leg alone.
Memory: this process's RSS before the broker's modules are imported, after the broker
started, and after all requests (the broker is a thread of this process).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import credkit

from coi.backend import ExecRequest, IncusClient
from coi.config.loader import load_config
from coi.tools.base import Broker, Tool

POOL, IMAGE = os.environ.get("COI_POOL", "coi"), "coi-tiny"
AGENT = Tool(
    name="bench",
    binary="sh",
    brokers=(Broker(provider="anthropic", env={"U": "{url}", "T": "{token}"}),),
)
BODY = json.dumps(
    {"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "x" * 2000}]}
)


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def per_request(client: httpx.Client, url: str, headers: dict[str, str], n: int) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        r = client.post(url, headers=headers, content=BODY)
        times.append(time.perf_counter() - t)
        assert r.status_code == 200, r.text
    return statistics.median(times)


def in_sandbox(c: IncusClient, box: str, token: str, n: int, expect: str) -> float:
    """Mean seconds per wget from inside the sandbox, timed inside (busybox date has no
    sub-second format: /proc/uptime's centiseconds over the whole loop)."""
    script = (
        "read s _ < /proc/uptime; i=0; codes=; "
        'while [ $i -lt "$N" ]; do '
        'wget -q -O /dev/null --header "x-api-key: $T" --header "content-type: application/json" '
        '--post-data "$B" http://127.0.0.1:41240/anthropic/v1/messages 2>/dev/null; '
        'codes="$codes $?"; i=$((i+1)); done; read e _ < /proc/uptime; echo "$s $e"; echo $codes'
    )
    res = c.exec.capture(
        box, ExecRequest(["sh", "-c", script], env={"N": str(n), "T": token, "B": BODY})
    )
    times, codes = res.stdout.decode().splitlines()[:2]
    assert set(codes.split()) == {expect}, (codes, res.stderr)
    start, end = (float(x) for x in times.split())
    return (end - start) / n


def create_cost(c: IncusClient, box: str) -> tuple[float, float]:
    """Seconds to create and start a sandbox, without and with a proxy device (to a socket
    nothing serves: forkproxy connects only when the sandbox does)."""
    out = []
    for extra in (
        {},
        {
            "coi-broker": {
                "type": "proxy",
                "listen": "tcp:127.0.0.1:41240",
                "connect": "unix:/nonexistent.sock",
                "bind": "container",
            }
        },
    ):
        name = f"{box}-c"
        devices = {"root": {"type": "disk", "path": "/", "pool": POOL}, **extra}
        t = time.perf_counter()
        c.instances.create(name, image=IMAGE, devices=devices, start=True)
        out.append(time.perf_counter() - t)
        c.instances.delete(name, force=True)
    return out[0], out[1]


def fmt(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1000:.2f} ms [{min(xs) * 1000:.2f}..{max(xs) * 1000:.2f}]"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    rss0 = rss_mib()
    tmp = Path(tempfile.mkdtemp(prefix="coi-bench-broker-"))
    standin = credkit.create(tmp)
    c = IncusClient.connect(project=os.environ.get("COI_PROJECT", "default"))
    box = f"bench-broker-{os.getpid()}"
    c.instances.create(
        box, image=IMAGE, devices={"root": {"type": "disk", "path": "/", "pool": POOL}}, start=True
    )
    try:
        from coi.credentials import session_broker

        env = {"HOME": str(tmp), "COI_HOME": str(tmp / "coi"), "ANTHROPIC_API_KEY": standin.key}
        cfg = load_config(files=[], env=env)
        cfg.set("credentials.upstream", {"anthropic": standin.url}, "bench")
        cfg.set("credentials.ca_bundle", str(standin.ca), "bench")
        create_plain, create_dev = create_cost(c, box)
        rss_imported = rss_mib()
        t = time.perf_counter()
        with session_broker(c, box, AGENT, cfg, env=env, attach=False) as h:
            started = time.perf_counter() - t
            assert h.device is not None
            t = time.perf_counter()
            c.instances.add_device(box, h.device_name, h.device)
            hotplug = time.perf_counter() - t
            rss_started = rss_mib()
            assert h.socket is not None
            token = h.env["T"]
            rows: dict[str, list[float]] = {
                "direct": [],
                "broker": [],
                "sandbox": [],
                "refused": [],
            }
            with (
                httpx.Client(verify=str(standin.ca)) as direct,
                httpx.Client(transport=httpx.HTTPTransport(uds=str(h.socket))) as via,
            ):
                credkit.check_route(standin)
                for _ in range(args.runs):
                    rows["direct"].append(
                        per_request(
                            direct,
                            f"{standin.url}/v1/messages",
                            {"x-api-key": standin.key},
                            args.requests,
                        )
                    )
                    rows["broker"].append(
                        per_request(
                            via,
                            "http://b/anthropic/v1/messages",
                            {"x-api-key": token},
                            args.requests,
                        )
                    )
                    rows["sandbox"].append(in_sandbox(c, box, token, args.requests, "0"))
                    rows["refused"].append(in_sandbox(c, box, "wrong", args.requests, "1"))
            rss_after = rss_mib()
        print(
            f"requests per row and run: {args.requests}, runs: {args.runs}, body {len(BODY)} bytes"
        )
        print(f"direct to the stand-in (host, keep-alive TLS)   {fmt(rows['direct'])}")
        print(f"through the broker (host, its unix socket)      {fmt(rows['broker'])}")
        added = [b - d for b, d in zip(rows["broker"], rows["direct"], strict=True)]
        print(f"  added by the broker                           {fmt(added)}")
        print(f"from the sandbox, wget per request, forwarded   {fmt(rows['sandbox'])}")
        print(f"from the sandbox, wget per request, refused     {fmt(rows['refused'])}")
        print(f"broker start (session_broker, attach=False)     {started * 1000:.0f} ms")
        print(f"proxy device added to the running sandbox       {hotplug * 1000:.0f} ms")
        print(
            "sandbox create+start without / with the device  "
            f"{create_plain * 1000:.0f} / {create_dev * 1000:.0f} ms"
        )
        print(
            f"RSS: {rss0:.1f} MiB at start, {rss_imported:.1f} after imports, "
            f"{rss_started:.1f} with the broker running (+{rss_started - rss_imported:.1f}), "
            f"{rss_after:.1f} after {4 * args.requests * args.runs} requests "
            f"(+{rss_after - rss_imported:.1f})"
        )
    finally:
        c.instances.delete(box, force=True)
        c.close()
        credkit.destroy(standin)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
