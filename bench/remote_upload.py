"""What a remote session sends with the workspace's cache (coi.sessions.wscache): a 200 MB
workspace's first session (the whole of it), then sessions after a small change (only what
changed), next to a plain whole upload measured in the same run.

    .venv/bin/python bench/remote_upload.py [--mb 200] [--runs 3]

Makes a workspace of MB files of 1 MB of random data plus 500 small files, starts a second
incusd reachable over HTTPS only (tests/remotekit.py: its own network namespace; its route is
checked before anything is sent; `--rate` limits that link, as a LAN would), adds it in
fresh config folders, and for each run:

- `coi --remote r1 run -- true` as coi was before the cache: the src/ of the commit before
  the one that added src/coi/sessions/wscache.py (or `--baseline REV`), taken with `git
  archive` into a temporary folder (the checkout is not touched): the whole workspace;
- the same with the cache, first session (after `coi clean --workspace-caches`);
- the same after a small change (one 1 MB file rewritten, one small file added, one deleted);
- `incus file push -r` of the folder into a container there (the incus client's own upload).

Bytes sent are what coi's summary line says ("Y MB sent"); times are each whole command's
wall time and the summary line's copy time. Everything it made is removed at the end.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import remotekit  # noqa: E402

from coi.images.tiny import build_tarball  # noqa: E402

SUMMARY = re.compile(
    r"Copied the workspace to the remote sandbox: (\d+) entries, ([\d.]+) MB of files "
    r"\(([\d.]+) MB sent(?:, (.*))?\) in ([\d.]+) s"
)


def _baseline_src(tmp: Path, rev: str) -> Path:
    """coi's src/ as it was at `rev` (git archive: the checkout is not touched)."""
    if not rev:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "log", "--format=%H", "-1", "--diff-filter=A", "--",
             "src/coi/sessions/wscache.py"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        rev = f"{out}^" if out else "HEAD"
    dest = tmp / "baseline"
    dest.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "src"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    print(f"baseline: coi at {rev}", flush=True)
    return dest / "src"


def _workspace(ws: Path, mb: int) -> None:
    for i in range(mb):
        (ws / f"big{i // 50}").mkdir(parents=True, exist_ok=True)
        (ws / f"big{i // 50}" / f"blob{i:03}.bin").write_bytes(os.urandom(1_000_000))
    for i in range(500):
        d = ws / f"src{i % 10}"
        d.mkdir(exist_ok=True)
        (d / f"f{i}.txt").write_text(f"line {i}\n" * 20)


def _change(ws: Path, n: int) -> None:
    """A small change: one 1 MB file rewritten, one small file added, one deleted."""
    (ws / "big0" / f"blob{n:03}.bin").write_bytes(os.urandom(1_000_000))
    (ws / "src0" / f"added{n}.txt").write_text(f"added in run {n}\n")
    (ws / "src1" / f"f{10 * n + 1}.txt").unlink()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--baseline", default="", help="the git revision of coi before the cache")
    ap.add_argument(
        "--rate",
        default="",
        help="limit the link to the daemon to this rate (tc tbf on the bench's own veth, "
        "e.g. 100mbit: a LAN); default: the veth's own speed",
    )
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="coi-bench-remote-upload-"))
    try:
        old_src = _baseline_src(tmp, args.baseline)
        ws = tmp / "ws"
        ws.mkdir()
        _workspace(ws, args.mb)
        tarball = build_tarball(tmp / "tiny.tar")
        with remotekit.running() as rd:
            remotekit.check_route(rd)
            if args.rate:
                # Only the bench's veth (gone with the daemon's namespace at the end).
                subprocess.run(
                    ["tc", "qdisc", "add", "dev", rd.veth, "root", "tbf", "rate", args.rate,
                     "burst", "256kb", "latency", "50ms"],
                    check=True, capture_output=True,
                )  # fmt: skip
            with rd.admin() as c:
                c.images.import_tarball(tarball, aliases=("coi-tiny",))
            env = {k: v for k, v in os.environ.items() if not k.startswith(("COI_", "INCUS"))}
            env.update(
                HOME=str(tmp / "home"),
                XDG_CONFIG_HOME=str(tmp / "xdg"),
                COI_HOME=str(tmp / "coi-home"),
                COI_IMAGE="coi-tiny",
                INCUS_CONF=str(tmp / "incus-conf"),
            )
            (tmp / "home").mkdir()
            coi = [sys.executable, "-m", "coi"]
            subprocess.run(
                [*coi, "remote", "add", "r1", rd.url, "--token", rd.trust_token("bench")],
                env=env, check=True, capture_output=True,
            )  # fmt: skip

            def session(src: Path | None = None) -> tuple[float, str]:
                e = dict(env)
                if src is not None:
                    e["PYTHONPATH"] = str(src)
                t = time.perf_counter()
                res = subprocess.run(
                    [*coi, "--remote", "r1", "run", "--network", "open", "-w", str(ws), "--",
                     "true"],
                    env=e, capture_output=True, text=True, check=False, cwd=tmp,
                )  # fmt: skip
                took = time.perf_counter() - t
                if res.returncode != 0:
                    raise SystemExit(res.stderr)
                line = next(x for x in res.stderr.splitlines() if SUMMARY.search(x))
                return took, line

            rows: dict[str, list[tuple[float, float, float]]] = {}

            def record(label: str, took: float, line: str) -> None:
                m = SUMMARY.search(line)
                assert m is not None
                rows.setdefault(label, []).append((float(m[3]), float(m[5]), took))
                print(f"{label}: {line.strip()} (the whole coi run {took:.2f} s)", flush=True)

            for n in range(args.runs):
                record("before the cache (whole)", *session(old_src))
                subprocess.run(
                    [*coi, "--remote", "r1", "clean", "--workspace-caches", "--force"],
                    env=env, check=True, capture_output=True,
                )  # fmt: skip
                record("first session (whole, the cache made)", *session())
                _change(ws, n)
                record("after a small change", *session())
                record("nothing changed", *session())

            # The incus client's own upload of the folder, over the same HTTPS address.
            incus = shutil.which("incus")
            pushes: list[float] = []
            if incus:
                ic = {**env, "HOME": str(tmp / "home")}
                subprocess.run(
                    [incus, "remote", "add", "b", rd.url, "--token", rd.trust_token("bench-i"),
                     "--accept-certificate"],
                    env=ic, check=True, capture_output=True,
                )  # fmt: skip
                subprocess.run(
                    [incus, "init", "b:coi-tiny", "b:plain", "-s", "coi", "--no-profiles"],
                    env=ic, check=True, capture_output=True,
                )  # fmt: skip
                subprocess.run([incus, "start", "b:plain"], env=ic, check=True, capture_output=True)
                for n in range(args.runs):
                    t = time.perf_counter()
                    subprocess.run(
                        [incus, "file", "push", "-r", "-q", str(ws), f"b:plain/root/run{n}/"],
                        env=ic, check=True, capture_output=True,
                    )  # fmt: skip
                    pushes.append(time.perf_counter() - t)
                    print(f"incus file push -r: {pushes[-1]:.2f} s", flush=True)
                subprocess.run(
                    [incus, "delete", "-f", "b:plain"], env=ic, check=False, capture_output=True
                )

            def med(xs: list[float]) -> str:
                return f"{statistics.median(xs):.2f} [{min(xs):.2f}..{max(xs):.2f}]"

            link = f"the link limited to {args.rate}" if args.rate else "the veth's own speed"
            print(f"\n{args.mb} MB workspace, {args.runs} runs, {link}, medians [min..max]:")
            for label, vals in rows.items():
                sent = med([v[0] for v in vals])
                print(
                    f"  {label}: {sent} MB sent, copied in {med([v[1] for v in vals])} s, "
                    f"coi run {med([v[2] for v in vals])} s"
                )
            if pushes:
                print(f"  incus file push -r of the folder: {med(pushes)} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
