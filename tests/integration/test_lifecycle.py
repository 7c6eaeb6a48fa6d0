"""Lifecycle and scripting commands on the real daemon: container, file, snapshot, image."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.conftest import run_coi

from coi import labels
from coi.backend import IncusClient


@pytest.fixture
def box(client: IncusClient, coi_env: dict[str, str], unique: str) -> Iterator[str]:
    """A running tiny container made with `coi container launch`."""
    res = run_coi("container", "launch", "coi-tiny", unique, env=coi_env)
    assert res.returncode == 0, res.stderr
    assert f"Container {unique} launched from coi-tiny" in res.stderr
    try:
        yield unique
    finally:
        client.instances.delete(unique, force=True)


def test_container_exists_running_exec_and_exit_codes(
    client: IncusClient, coi_env: dict[str, str], box: str
) -> None:
    def coi(*args: str) -> tuple[int, str, str]:
        r = run_coi("container", *args, env=coi_env)
        return r.returncode, r.stdout, r.stderr

    assert coi("exists", box) == (0, "", "")
    assert coi("exists", "no-such-box") == (1, "", "")
    assert coi("running", box) == (0, "", "")

    code, out, err = coi("exec", box, "--", "sh", "-c", "echo hi; exit 3")
    assert (code, out) == (3, "hi\n")
    assert "Error: command failed: exit status 3" in err
    # The upstream bug fixed: JSON capture passes the command's exit code on.
    code, out, _ = coi("exec", box, "--capture", "--", "sh", "-c", "echo o; echo e >&2; exit 4")
    assert code == 4
    assert json.loads(out) == {"stdout": "o\n", "stderr": "e\n", "exit_code": 4}
    code, out, err = coi("exec", box, "--capture", "--format", "raw", "--", "sh", "-c", "echo r")
    assert (code, out) == (0, "r\n")
    code, out, _ = coi(
        "exec", box, "--user", "1000", "--cwd", "/tmp", "--env", "A=b", "--",
        "sh", "-c", 'echo "$(id -u) $(pwd) $A"',
    )  # fmt: skip
    assert (code, out) == (0, "1000 /tmp b\n")

    assert coi("exec", box)[0] == 2
    assert "no command specified (use -- before command)" in coi("exec", box)[2]
    code, _, err = coi("exec", box, "--format", "raw", "--", "true")
    assert code == 2 and "--format flag requires --capture flag" in err
    code, _, err = coi("exec", box, "--capture", "--format", "xml", "--", "true")
    assert code == 2 and "invalid format 'xml': must be 'json' or 'raw'" in err
    code, _, err = coi("exec", "no-such-box", "--", "true")
    assert code == 1 and "no-such-box" in err

    code, _, err = coi("delete", box)
    assert code == 1 and "is running" in err and "--force" in err
    assert coi("stop", box, "--force")[0] == 0
    assert coi("running", box) == (1, "", "")
    assert coi("start", box)[0] == 0
    assert coi("running", box)[0] == 0

    code, out, _ = coi("list", "--format", "json")
    assert code == 0 and box in [c["name"] for c in json.loads(out)]
    code, out, _ = coi("list")
    assert code == 0 and out.startswith("NAME") and box in out
    code, _, err = coi("list", "--format", "yaml")
    assert code == 2 and "invalid format 'yaml': must be 'json' or 'text'" in err

    assert coi("delete", box, "--force")[0] == 0
    assert coi("exists", box)[0] == 1


def test_container_mount_adds_a_host_directory(
    coi_env: dict[str, str], box: str, tmp_path: Path
) -> None:
    (tmp_path / "data.txt").write_text("from the host\n")
    tmp_path.chmod(0o755)
    (tmp_path / "data.txt").chmod(0o644)
    res = run_coi("container", "mount", box, "data", str(tmp_path), "/data", "--readonly",
                  env=coi_env)  # fmt: skip
    assert res.returncode == 0, res.stderr
    res = run_coi("container", "exec", box, "--", "cat", "/data/data.txt", env=coi_env)
    assert res.stdout == "from the host\n"
    res = run_coi("container", "exec", box, "--", "touch", "/data/new", env=coi_env)
    assert res.returncode != 0  # read-only
    res = run_coi("container", "mount", box, "d2", str(tmp_path), "relative", env=coi_env)
    assert res.returncode == 2 and "container path must be absolute" in res.stderr
    res = run_coi("container", "mount", box, "d3", "/no/such/dir", "/x", env=coi_env)
    assert res.returncode != 0 and "/no/such/dir" in res.stderr


def _tree(root: Path) -> dict[str, tuple[int, bytes | str]]:
    """Every entry under root: relative path -> (mode, content or link target)."""
    out: dict[str, tuple[int, bytes | str]] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        st = p.lstat()
        if stat.S_ISLNK(st.st_mode):
            out[rel] = (0, os.readlink(p))
        elif p.is_dir():
            out[rel] = (stat.S_IMODE(st.st_mode), "dir")
        else:
            out[rel] = (stat.S_IMODE(st.st_mode), p.read_bytes())
    return out


def test_file_push_pull_round_trip_with_modes(
    coi_env: dict[str, str], box: str, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    (src / "bin").mkdir(parents=True)
    (src / "empty").mkdir()
    (src / "bin" / "run.sh").write_bytes(b"#!/bin/sh\necho run\n")
    (src / "bin" / "run.sh").chmod(0o755)
    (src / "secret.txt").write_bytes(os.urandom(70_000))
    (src / "secret.txt").chmod(0o600)
    (src / "bin").chmod(0o750)
    (src / "link").symlink_to("bin/run.sh")

    res = run_coi("file", "push", "-r", str(src), f"{box}:/srv/tree", env=coi_env)
    assert res.returncode == 0, res.stderr
    assert f"Pushed directory {src} -> {box}:/srv/tree" in res.stderr
    back = tmp_path / "back"
    back.mkdir()
    (back / "stale").write_text("replaced by the pull")
    res = run_coi("file", "pull", "-r", f"{box}:/srv/tree", str(back), env=coi_env)
    assert res.returncode == 0, res.stderr
    # What comes out is data: the link is left out, and said so.
    assert _tree(back) == {k: v for k, v in _tree(src).items() if k != "link"}
    assert "Warning: not copied: /srv/tree/link (symbolic link -> bin/run.sh)" in res.stderr

    one = tmp_path / "one.txt"
    res = run_coi("file", "pull", f"{box}:/srv/tree/bin/run.sh", str(one), env=coi_env)
    assert res.returncode == 0 and one.read_bytes() == b"#!/bin/sh\necho run\n"
    assert stat.S_IMODE(one.stat().st_mode) == 0o755

    def err(*args: str) -> tuple[int, str]:
        r = run_coi("file", *args, env=coi_env)
        return r.returncode, r.stderr

    code, msg = err("push", str(src), f"{box}:/x")
    assert code == 2 and "source is a directory, use -r flag" in msg
    code, msg = err("push", str(tmp_path / "missing"), f"{box}:/x")
    assert code == 1 and "source does not exist" in msg
    code, msg = err("push", str(one), "no-colon")
    assert code == 2 and "destination must be in format 'container:path'" in msg
    code, msg = err("pull", "no-colon", str(tmp_path / "x"))
    assert code == 2 and "source must be in format 'container:path'" in msg
    code, msg = err("pull", f"{box}:relative/path", str(tmp_path / "x"))
    assert code == 2 and "container path must be absolute" in msg
    code, msg = err("pull", f"{box}:/no/such/file", str(tmp_path / "x"))
    assert code == 1 and "source does not exist" in msg
    code, msg = err("pull", "no-such-box:/etc/hostname", str(tmp_path / "x"))
    assert code == 1 and "container no-such-box not found" in msg
    assert not (tmp_path / "x").exists()


def test_snapshot_create_change_restore_brings_the_file_back(
    coi_env: dict[str, str], box: str
) -> None:
    env = {**coi_env, "COI_CONTAINER": box}

    def coi(*args: str, stdin: str | None = None) -> tuple[int, str, str]:
        r = run_coi("snapshot", *args, env=env, input=stdin)
        return r.returncode, r.stdout, r.stderr

    run_coi("container", "exec", box, "--", "sh", "-c", "echo v1 > /root/f", env=coi_env)
    code, _, err = coi("create", "before")
    assert code == 0 and f"Created snapshot 'before' for container '{box}'" in err
    code, _, err = coi("create", "before")
    assert code == 1 and "already exists" in err
    run_coi("container", "exec", box, "--", "sh", "-c", "echo v2 > /root/f", env=coi_env)

    code, out, _ = coi("list")
    assert code == 0 and f"Snapshots for {box}:" in out and "Total: 1 snapshot" in out
    code, out, _ = coi("list", "--format", "json")
    data = json.loads(out)
    assert data["container"] == box and [s["name"] for s in data["snapshots"]] == ["before"]
    code, out, _ = coi("info", "before", "--format", "json")
    assert json.loads(out)["snapshot"]["stateful"] is False
    code, out, _ = coi("info", "before")
    assert "Snapshot: before" in out and "Stateful: no" in out

    # Running container, no --force, answer "no": refused with upstream's message.
    code, _, err = coi("restore", "before", stdin="n\n")
    assert code == 1 and "must be stopped before restore" in err
    code, _, err = coi("restore", "before", "-f")
    assert code == 0 and f"Restored container '{box}' from snapshot 'before'" in err
    res = run_coi("container", "exec", box, "--", "cat", "/root/f", env=coi_env)
    assert res.stdout == "v1\n"  # and the container runs again

    code, _, err = coi("restore", "nope", "-f")
    assert code == 1 and f"snapshot 'nope' not found for container '{box}'" in err
    code, _, err = coi("delete")
    assert code == 2 and "snapshot name required" in err
    code, _, err = coi("delete", "before")
    assert code == 0 and "Deleted snapshot 'before'" in err
    code, out, _ = coi("list")
    assert "(none)" in out and "Total: 0 snapshots" in out

    r = run_coi("snapshot", "list", "-c", "no-such-box", env=coi_env)
    assert r.returncode == 1 and "container 'no-such-box' not found" in r.stderr
    r = run_coi("snapshot", "list", env=coi_env, cwd=Path("/"))
    assert r.returncode == 2 and "no COI containers found for current workspace" in r.stderr


def test_image_list_exists_publish_cleanup_delete(
    client: IncusClient, coi_env: dict[str, str], box: str, unique: str
) -> None:
    def coi(*args: str) -> tuple[int, str, str]:
        r = run_coi("image", *args, env=coi_env, timeout=300)
        return r.returncode, r.stdout, r.stderr

    assert coi("exists", "coi-tiny") == (0, "", "")
    assert coi("exists", "no-such-image") == (1, "", "")
    code, out, _ = coi("list", "--format", "json")
    assert code == 0 and any("coi-tiny" in i["aliases"] for i in json.loads(out))
    code, out, _ = coi("list")
    assert "✓ coi-tiny" in out
    # Whether `coi` is built depends on whether the build tests ran first.
    built = client.images.exists("coi")
    assert ("  ✓ coi\n" in out) if built else ("✗ coi (not built)" in out and "coi build" in out)
    assert "coi-tiny" in run_coi("images", "--all", env=coi_env).stdout
    code, _, err = coi("list", "--format", "xml")
    assert code == 2 and "invalid format 'xml'" in err

    code, out, err = coi("publish", box, f"{unique}-20260101-000000", "--description", "t")
    assert code == 0, err
    fp = json.loads(out)["fingerprint"]
    assert not client.instances.exists(box)  # publish consumes the container (as upstream)
    for stamp in ("20260102-000000", "20260103-000000"):
        client.images.create_alias(f"{unique}-{stamp}", fp)
    code, out, _ = coi("list", "--prefix", f"{unique}-")
    assert f"Images with prefix '{unique}-':" in out and out.count(unique) == 4

    code, _, err = coi("cleanup", f"{unique}-", "--keep", "0")
    assert code == 2 and "--keep must be > 0" in err
    code, _, err = coi("cleanup", f"{unique}-", "--keep", "1")
    assert code == 0, err
    assert "Deleted 2 old version(s):" in err and f"  - {unique}-20260101-000000" in err
    assert "Kept 1 recent version(s):" in err and f"  - {unique}-20260103-000000" in err
    assert not client.images.exists(f"{unique}-20260101-000000")
    assert client.images.alias_target(f"{unique}-20260103-000000") == fp

    assert coi("delete", f"{unique}-20260103-000000")[0] == 0
    assert fp not in [i.fingerprint for i in client.images.list()]
    code, _, err = coi("delete", "no-such-image")
    assert code == 1 and "image 'no-such-image' not found" in err


def test_sandboxes_start_from_a_template_and_clean_drops_stale_ones(
    client: IncusClient, coi_env: dict[str, str], unique: str, tmp_path: Path, pool: str
) -> None:
    """The pre-shifted template: made on first use, invisible to `coi list`, reused, and
    removed by `coi clean` once its image is gone. Forced on (`always`): by default only a
    daemon that re-owns files at start gets templates (next test)."""
    from coi.sessions import template

    coi_env = {**coi_env, "COI_TEMPLATES": "always"}

    # An image of our own (a different fingerprint from coi-tiny) so deleting it is safe.
    client.instances.create(
        unique, image="coi-tiny", devices={"root": {"type": "disk", "path": "/", "pool": pool}}
    )
    (tmp_path / "marker").write_text(unique)
    client.files.push_file(unique, tmp_path / "marker", "/etc/coi-marker")
    fp = client.images.publish(instance=unique, aliases=(f"{unique}-img",))
    client.instances.delete(unique, force=True)
    ws = tmp_path / "ws"
    ws.mkdir()
    try:
        for _ in range(2):
            res = run_coi(
                "run", "--image", f"{unique}-img", "-w", str(ws), "--", "cat", "/etc/coi-marker",
                env=coi_env,
            )  # fmt: skip
            assert res.returncode == 0 and res.stdout.strip() == unique, res.stderr
        tmpls = [n for n in client.instances.names() if n.startswith(template.PREFIX + fp[:12])]
        assert len(tmpls) == 1, client.instances.names()
        inst = client.instances.get(tmpls[0])
        assert inst.status == "Stopped" and inst.config[labels.TEMPLATE_READY] == "true"
        listing = run_coi("list", "--format", "json", env=coi_env)
        assert tmpls[0] not in listing.stdout
        kept = run_coi("clean", "--force", env=coi_env)
        assert client.instances.exists(tmpls[0]), kept.stdout  # its image is still there
    finally:
        client.images.delete(fp)
    res = run_coi("clean", "--force", env=coi_env)
    assert res.returncode == 0, res.stderr
    assert f"Deleting {tmpls[0]}" in res.stdout
    assert not client.instances.exists(tmpls[0])


def test_list_reads_saved_sessions_only_for_containers_that_lack_their_own_facts(
    client: IncusClient, unique: str, tmp_path: Path, pool: str
) -> None:
    """`coi list` with hundreds of saved sessions: a sandbox carries its workspace and
    persistence in its config, so the session files are read only for an older container
    that does not (and then its metadata still fills the gaps)."""
    from coi.sessions.inventory import SavedSession, containers
    from coi.sessions.store import Metadata

    root = {"root": {"type": "disk", "path": "/", "pool": pool}}
    new, old = f"coi-{unique}-1", f"coi-{unique}-2"
    facts = {"user.coi.persistent": "false", "user.coi.workspace": str(tmp_path)}
    client.instances.create(new, image="coi-tiny", devices=root, config=facts)
    reads: list[int] = []
    meta = Metadata(
        session_id="s1", container_name=old, persistent=True, workspace="/old/ws",
        saved_at="2026-01-01T00:00:00Z", tool="claude",
    )  # fmt: skip

    def sessions() -> list[SavedSession]:
        reads.append(1)
        return [SavedSession("s1", "claude", tmp_path, meta, True)]

    try:
        (info,) = [c for c in containers(client, sessions) if unique in c.name]
        assert reads == [] and info.workspace == str(tmp_path) and not info.persistent
        client.instances.create(old, image="coi-tiny", devices=root)
        listed = {c.name: c for c in containers(client, sessions) if unique in c.name}
        assert reads == [1]
        assert listed[old].workspace == "/old/ws" and listed[old].persistent
        assert listed[new].workspace == str(tmp_path)
    finally:
        for n in (new, old):
            if client.instances.exists(n):
                client.instances.delete(n, force=True)


def test_templates_are_made_only_where_they_pay_off_and_cleaned_where_they_do_not(
    client: IncusClient, coi_env: dict[str, str], unique: str, tmp_path: Path, pool: str
) -> None:
    """By default (`auto`) a sandbox is a copy of a template only on a daemon that re-owns a
    container's files at its first start (coi setup's verdict on the pool); elsewhere it is
    made from the image, and `coi clean` removes templates an older coi left."""
    from coi.sessions import template

    client.instances.create(
        unique, image="coi-tiny", devices={"root": {"type": "disk", "path": "/", "pool": pool}}
    )
    fp = client.images.publish(instance=unique, aliases=(f"{unique}-img",))
    client.instances.delete(unique, force=True)
    ws = tmp_path / "ws"
    ws.mkdir()

    def templates() -> list[str]:
        return [n for n in client.instances.names() if n.startswith(template.PREFIX + fp[:12])]

    pays = template.pay_off(client, pool)
    try:
        res = run_coi("run", "--image", f"{unique}-img", "-w", str(ws), "--", "true", env=coi_env)
        assert res.returncode == 0, res.stderr
        assert bool(templates()) == pays, (pays, client.instances.names())
        if not pays:
            # One an older coi (or `always`) made: the default clean removes it.
            forced = {**coi_env, "COI_TEMPLATES": "always", "COI_SPARES": "0"}
            res = run_coi(
                "run", "--image", f"{unique}-img", "-w", str(ws), "--", "true", env=forced
            )
            assert res.returncode == 0 and templates(), res.stderr
            res = run_coi("clean", "--force", env=coi_env)
            assert res.returncode == 0, res.stderr
            assert templates() == [], res.stdout
            assert not [n for n in client.instances.names() if n.startswith(template.SPARE_PREFIX)]
    finally:
        for n in templates():
            client.instances.delete(n, force=True)
        for n in client.instances.names():
            if n.startswith(template.SPARE_PREFIX):
                client.instances.delete(n, force=True)
        client.images.delete(fp)
