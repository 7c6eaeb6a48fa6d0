"""The attack suite's detection table: every attack and benign workload of tests/attacks, run
as the agent under `coi run --monitor` (default settings), plain, from a script file, and with
its programs renamed; per family, how many were caught at the expected level, how fast, and
what was done; false alarms on the benign set.

    sudo .venv/bin/python bench/attacks.py [--variants plain,script,renamed] [--format json]
        [--family "reverse shell"] [--workers 2] [--image coi-tiny]

It makes a daemon project of its own (with the tiny image) and the test's network namespace
(every target is a host it creates, routes checked before anything is sent), and removes both.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.attacks import corpus, harness  # noqa: E402
from tests.attacks import net as attacknet  # noqa: E402

from coi.backend import IncusClient  # noqa: E402
from coi.images.tiny import build_tarball  # noqa: E402


def _row(outs: list[harness.Outcome]) -> dict[str, Any]:
    ran = [o for o in outs if not o.skipped]
    caught = [o for o in ran if o.detected]
    times = [o.alert_after for o in caught if o.alert_after is not None]
    actions: dict[str, int] = {}
    for o in ran:
        actions[o.action or "none"] = actions.get(o.action or "none", 0) + 1
    sent = [o.bytes_out for o in ran if o.bytes_out is not None]
    return {
        "detected": len(caught),
        "ran": len(ran),
        "not_run": [f"{o.entry.name} ({o.skipped})" for o in outs if o.skipped],
        "median_s": round(statistics.median(times), 2) if times else None,
        "max_s": round(max(times), 2) if times else None,
        "actions": actions,
        "max_bytes_out": max(sent) if sent else None,
        "missed": [f"{o.entry.name}: {o.level}/{o.action or '-'} {o.title}".strip() for o in ran
                   if not o.detected],
    }  # fmt: skip


def table(results: dict[tuple[str, str], harness.Outcome], variants: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for v in variants:
        rows: dict[str, Any] = {}
        for fam in (*corpus.FAMILIES, corpus.BENIGN):
            outs = [o for (_, var), o in results.items() if var == v and o.entry.family == fam]
            if outs:
                rows[fam] = _row(outs)
        attacks = [o for (_, var), o in results.items() if var == v and o.entry.level != "info"]
        ran = [o for o in attacks if not o.skipped]
        rows["all attacks"] = _row(attacks)
        rows["all attacks"]["percent"] = (
            round(100 * sum(o.detected for o in ran) / len(ran), 1) if ran else None
        )
        out[v] = rows
    return out


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def text(tab: dict[str, Any]) -> str:
    lines = []
    for v, rows in tab.items():
        lines += [
            f"\n## {v}",
            "",
            "| family | detected | median s | max s | actions | not run |",
            "|---|---|---|---|---|---|",
        ]
        for fam, r in rows.items():
            acts = ", ".join(f"{k} {n}" for k, n in sorted(r["actions"].items()))
            if fam == corpus.BENIGN:
                alarms = r["ran"] - r["detected"]
                lines.append(
                    f"| benign (false alarms) | {alarms} of {r['ran']} | - | - | {acts} | "
                    f"{len(r['not_run'])} |"
                )
                continue
            det = f"{r['detected']}/{r['ran']}"
            if r.get("percent") is not None:
                det += f" ({r['percent']} %)"
            if r["max_bytes_out"] is not None:
                acts += f"; most bytes out {r['max_bytes_out'] / 1e6:.1f} MB"
            lines.append(
                f"| {fam} | {det} | {_s(r['median_s'])} | {_s(r['max_s'])} | {acts} | "
                f"{len(r['not_run'])} |"
            )
        missed = [(fam, m) for fam, r in rows.items() if fam != "all attacks" for m in r["missed"]]
        if missed:
            lines += ["", "Missed or false alarms:"] + [f"- {fam}: {m}" for fam, m in missed]
        skipped = [n for fam, r in rows.items() if fam != "all attacks" for n in r["not_run"]]
        if skipped:
            lines += ["", "Not run:"] + [f"- {n}" for n in skipped]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default="plain,script,renamed")
    ap.add_argument("--format", choices=("text", "json"), default="text")
    ap.add_argument("--family", action="append", help="only these families (repeatable)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--image", default="coi-tiny")
    ap.add_argument("--save", type=Path, help="also write the JSON report to this file")
    args = ap.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in harness.VARIANTS:
            ap.error(f"unknown variant {v}: {', '.join(harness.VARIANTS)}")
    entries = [e for e in corpus.ALL if not args.family or e.family in args.family]

    tmp = Path(tempfile.mkdtemp(prefix="coi-attacks-"))
    root = IncusClient.connect()
    # Named as the test runs' projects are: a run that finds it orphaned purges it.
    project = f"coi-test-{secrets.token_hex(3)}"
    root.projects.create(
        project,
        config={"features.images": "true", "features.profiles": "true"},
        description=f"coi attack table, pid {os.getpid()}",
    )
    net = None
    t0 = time.monotonic()
    try:
        with root.with_project(project) as client:
            if args.image == "coi-tiny":
                client.images.import_tarball(
                    build_tarball(tmp / "tiny.tar"), aliases=("coi-tiny",),
                    properties={"description": "coi tiny image"},
                )  # fmt: skip
            for attempt in range(60):  # another test run may hold netkit's fixed addresses
                try:
                    net = attacknet.create(tmp / f"net{attempt}")
                    break
                except RuntimeError as err:
                    if "overlaps" not in str(err) or attempt == 59:
                        raise
                    time.sleep(10)
            assert net is not None
            env = {k: v for k, v in os.environ.items() if not k.startswith("COI_")}
            env.update(COI_PROJECT=project, XDG_CONFIG_HOME=str(tmp / "xdg"))
            have = harness.probe(args.image, {**env, "COI_HOME": str(tmp / "ph")}, tmp / "pw")
            mounts, missing = harness.host_extras() if args.image == "coi-tiny" else ({}, {})
            runner = harness.Runner(
                client, net, tmp, env, image=args.image, available=have, mounts=mounts,
                missing=missing,
            )  # fmt: skip
            jobs = [(e, v) for e in entries for v in variants]
            results = runner.run_all(jobs, workers=args.workers)
    finally:
        if net is not None:
            attacknet.destroy(net)
        root.projects.purge(project)
        root.close()
        shutil.rmtree(tmp, ignore_errors=True)
    took = time.monotonic() - t0
    tab = table(results, variants)
    cases = [
        {
            "id": o.entry.id, "variant": o.variant, "expected": o.entry.level,
            "level": o.level, "action": o.action, "title": o.title,
            "detected": o.detected, "alert_after_s": o.alert_after,
            "bytes_out": o.bytes_out, "exit_code": o.exit_code, "skipped": o.skipped,
            "error": o.error,
        }
        for o in results.values()
    ]  # fmt: skip
    report = json.dumps({"seconds": round(took), "table": tab, "cases": cases}, indent=1)
    if args.save:
        args.save.write_text(report + "\n")
    if args.format == "json":
        print(report)
    else:
        print(f"# coi attack suite ({args.image}, {len(jobs)} runs in {took:.0f} s)")
        print(text(tab))


if __name__ == "__main__":
    main()
