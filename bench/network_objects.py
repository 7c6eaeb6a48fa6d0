"""What a bridge per policy costs, and whether the daemon can put an ACL on one NIC instead.

    sudo .venv/bin/python bench/network_objects.py [--runs 5]

Rows (median [min..max]):
- making a new policy's bridge and ACL (`ensure_network` for a policy not seen before: the
  first session of a new policy pays it), and removing them;
- the same call once they exist (every later session of that policy);
- per-NIC ACLs: a container on the setup bridge whose NIC names an ACL (`security.acls` on the
  NIC, API extension `network_bridge_acl_devices`), started: does the daemon apply it, and how
  long does that start take against the same container without it.
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import tempfile
import time
from pathlib import Path

from _common import fmt, timed

from coi.backend import ExecRequest, IncusClient
from coi.errors import BackendError
from coi.network.manager import ensure_network
from coi.network.policy import Target, build_policy

NET = "coibr0"
POOL = "coi"


def policy_rows(c: IncusClient, runs: int, locks: Path) -> list[str]:
    make: list[float] = []
    again: list[float] = []
    drop: list[float] = []
    for _ in range(runs):
        # An allowlist entry of its own: a policy no earlier run has a bridge for.
        entry = f"198.51.100.{secrets.randbelow(200) + 20}"
        policy = build_policy(
            "allowlist",
            block_private=True,
            block_metadata=True,
            allow_local=False,
            allowed=[Target(f"{entry}/32")],
            entries=[entry],
        )
        make.append(timed(lambda: ensure_network(
            c, policy, default_network=NET, lock_dir=locks, log=lambda _m: None)))  # fmt: skip
        again.append(timed(lambda: ensure_network(
            c, policy, default_network=NET, lock_dir=locks, log=lambda _m: None)))  # fmt: skip
        t = time.perf_counter()
        c.networks.delete(policy.name)
        c.networks.delete_acl(policy.name)
        drop.append(time.perf_counter() - t)
    return [
        f"| new policy: make its bridge and ACL | {fmt(make)} |",
        f"| known policy: the same call | {fmt(again)} |",
        f"| remove the bridge and ACL | {fmt(drop)} |",
    ]


def per_nic_rows(c: IncusClient, runs: int) -> list[str]:
    if not c.has_extension("network_bridge_acl_devices"):
        return ["| per-NIC ACL | the server lacks `network_bridge_acl_devices` |"]
    acl = f"bench-acl-{secrets.token_hex(3)}"
    c.networks.create_acl(
        acl, egress=[{"action": "allow", "destination": "0.0.0.0/0", "state": "enabled"}]
    )
    plain: list[float] = []
    with_acl: list[float] = []
    error = ""
    try:
        for i in range(runs):
            for acls, out in (("", plain), (acl, with_acl)):
                name = f"bench-nic{i}{'a' if acls else 'p'}"
                nic = {"type": "nic", "network": NET, "name": "eth0"}
                if acls:
                    nic["security.acls"] = acls
                devices = {"root": {"type": "disk", "path": "/", "pool": POOL}, "eth0": nic}
                c.instances.create(name, image="coi-tiny", devices=devices)

                def start_exec(name: str = name) -> None:
                    c.instances.start(name)
                    c.exec.run(name, ExecRequest(["true"]))

                try:
                    out.append(timed(start_exec))
                except BackendError as err:
                    error = err.message
                finally:
                    c.instances.delete(name, force=True)
                if error:
                    break
            if error:
                break
    finally:
        c.networks.delete_acl(acl)
    if error:
        return [f"| per-NIC ACL | refused by the daemon at start: {error[:300]} |"]
    return [
        f"| start + exec, plain NIC | {fmt(plain)} |",
        f"| start + exec, NIC with its own ACL | {fmt(with_acl)} |",
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    c = IncusClient.connect()
    locks = Path(tempfile.mkdtemp(prefix="coi-bench-locks-"))
    try:
        rows = policy_rows(c, a.runs, locks) + per_nic_rows(c, a.runs)
    finally:
        shutil.rmtree(locks, ignore_errors=True)
    print(f"{c.server.display_name}, firewall {c.server.firewall}, {a.runs} runs\n")
    print("| row | time |")
    print("|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
