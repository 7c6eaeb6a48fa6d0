"""The real agent CLIs of the `coi` image, each started by a real `coi shell` with the
credential broker, talking to a stand-in provider (tests/credkit.py) through it: the CLI's
answer is the stand-in's canned reply, the stand-in received the real test key, and the
sandbox never held it (its files, every process's environment, the daemon's view).

The sandbox's network is an allowlist of the stand-in's :443 alone: a request a CLI makes to
its real service (telemetry, update checks, model lists) goes nowhere, and that is checked
from inside before the CLI runs (the stand-in's port 80 counts connections: none may come).

coi runs each tool through `[tool] binary`, a wrapper this test mounts: it waits for the
test, runs the real CLI non-interactively with the arguments coi gave it, and waits again
while the test searches the sandbox. Needs the full `coi` image (the session's `coi_image`
fixture builds it once per run, a few minutes; the seven tests take 2-3 min, 14-45 s
each).
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest
from tests import credkit
from tests.conftest import coi_argv
from tests.integration.conftest import USER, coi_names, remove_containers, user_dir, wait_gone

from coi.audit.log import AuditLog
from coi.backend import ExecRequest, IncusClient

# The first user of the coi image builds it (a few minutes).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

PROMPT = "say hi"
# Per case: the tool, the provider it is brokered for here (opencode and aider have two:
# each is run), and how the wrapper runs the real CLI non-interactively ("$@": the arguments
# coi starts the tool with, e.g. claude's --permission-mode bypassPermissions --session-id).
AIDER = (
    f'aider "$@" --message "{PROMPT}" --no-git --no-check-update --no-show-model-warnings '
    "--no-show-release-notes --analytics-disable --model"
)
CASES: dict[str, tuple[str, str, str]] = {
    "claude": ("claude", "anthropic", f'claude "$@" -p "{PROMPT}"'),
    "codex": ("codex", "openai", f'codex exec "$@" --skip-git-repo-check "{PROMPT}"'),
    # --skip-trust: headless gemini refuses an untrusted folder (not a broker matter).
    "gemini": ("gemini", "gemini", f'gemini "$@" --skip-trust -p "{PROMPT}"'),
    "opencode": (
        "opencode",
        "anthropic",
        f'opencode run "$@" -m anthropic/claude-sonnet-4-5 "{PROMPT}"',
    ),
    "opencode-openai": ("opencode", "openai", f'opencode run "$@" -m openai/gpt-5 "{PROMPT}"'),
    "aider": ("aider", "anthropic", f"{AIDER} anthropic/claude-sonnet-4-5"),
    "aider-openai": ("aider", "openai", f"{AIDER} openai/gpt-4o"),
}
KEY_VARIABLE = {
    "anthropic": "ANTHROPIC_API_KEY",
    "openai": "OPENAI_API_KEY",
    "gemini": "GEMINI_API_KEY",
}
# How the broker hands the real key to each provider.
KEY_HEADER = {"anthropic": "x-api-key", "openai": "authorization", "gemini": "x-goog-api-key"}
# The path of each provider's model call (the rest of a CLI's requests may vary).
MODEL_CALL = {
    "anthropic": re.compile(r"^/v1/messages(\?|$)"),
    "openai": re.compile(r"^/v1/(responses|chat/completions)(\?|$)"),
    "gemini": re.compile(r"^/v1beta/models/[^/]+:(stream)?[gG]enerateContent"),
}

_WRAPPER = """#!/bin/bash
# coi starts this as the tool ([tool] binary), with the tool's own arguments.
echo "coi-kit: ready"; read -r go
{command} > /workspace/out.txt 2> /workspace/err.txt < /dev/null
echo "coi-kit: exit $?"
echo "coi-kit: done"; read -r end
"""


@pytest.fixture(scope="module")
def agent_image(request: pytest.FixtureRequest, test_project: str) -> str:
    """The full `coi` image in the test project: built (`coi_image`), or, for a quicker
    rerun while working on this file, imported from the tarball COI_TEST_IMAGE_TARBALL names
    (`incus image export coi`)."""
    tarball = os.environ.get("COI_TEST_IMAGE_TARBALL")
    if not tarball:
        return str(request.getfixturevalue("coi_image"))
    with IncusClient.connect(project=test_project) as c:
        c.images.import_tarball(Path(tarball), aliases=("coi",))
    return f"imported from {tarball}"


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[credkit.StandIn]:
    s = credkit.create(tmp_path_factory.mktemp("standin"))
    try:
        yield s
    finally:
        credkit.destroy(s)


def _setup(
    base: Path, uenv: dict[str, str], user: pwd.struct_passwd, standin: credkit.StandIn, case: str
) -> tuple[dict[str, str], Path, Path]:
    """The user's config (the wrapper as the tool, the allowlist, the stand-in as every
    provider's upstream), the wrapper's folder, the workspace; the environment with the key."""
    tool, provider, command = CASES[case]
    home = Path(uenv["HOME"])
    ca = base / "ca.pem"
    shutil.copyfile(standin.ca, ca)
    kit = user_dir(base / "kit", user)
    wrapper = kit / tool
    wrapper.write_text(_WRAPPER.format(command=f"timeout 180 {command}"))
    wrapper.chmod(0o755)
    conf = user_dir(home / ".config" / "coi", user) / "config.toml"
    upstreams = "".join(f'{p} = "{standin.url}"\n' for p in KEY_VARIABLE)
    conf.write_text(
        f'[tool]\nbinary = "/opt/kit/{tool}"\n'
        f'[network]\nmode = "allowlist"\nallowed_domains = ["{standin.addr}:443"]\n'
        f'[credentials]\nca_bundle = "{ca}"\n'
        f"[credentials.upstream]\n{upstreams}"
    )
    for p in (ca, conf, wrapper):
        os.chown(p, user.pw_uid, user.pw_gid)
    ws = user_dir(base / "ws", user)
    return {**uenv, KEY_VARIABLE[provider]: standin.key}, kit, ws


def _probe(client: IncusClient, name: str, addr: str, port: int) -> bool:
    """Does a TCP connection from inside the sandbox to addr:port get through?"""
    script = f"timeout 5 bash -c 'exec 3<>/dev/tcp/{addr}/{port}'"
    return client.exec.quiet(name, ExecRequest(["sh", "-c", script])) == 0


def _only_the_standin_is_reachable(
    client: IncusClient, name: str, standin: credkit.StandIn
) -> None:
    """Before the CLI runs: the sandbox's ACL allows the stand-in's :443 and nothing else,
    and from inside, its :443 answers while its :80 (not on the allowlist) gets nothing."""
    credkit.check_route(standin)
    inst = client.instances.get(name)
    nics = [d for d in inst.expanded_devices.values() if d.get("type") == "nic"]
    assert len(nics) == 1, nics
    acl = client.networks.acl(nics[0]["network"])
    assert acl is not None
    allowed = {r.get("destination") for r in acl.egress if r.get("action") == "allow"}
    assert allowed == {f"{standin.addr}/32"}, acl.egress
    assert _probe(client, name, standin.addr, 443)  # the probe itself works
    assert not _probe(client, name, standin.addr, 80)
    assert standin.canary_hits() == []


@pytest.mark.parametrize("case", list(CASES))
def test_the_real_cli_answers_through_the_broker_and_the_sandbox_never_holds_the_key(
    client: IncusClient,
    agent_image: str,
    base: Path,
    uenv: dict[str, str],
    user: pwd.struct_passwd,
    standin: credkit.StandIn,
    case: str,
) -> None:
    tool, provider, _ = CASES[case]
    env, kit, ws = _setup(base, uenv, user, standin, case)
    argv = coi_argv(
        "shell", "--tool", tool, "--tmux=false", "-w", str(ws), "--mount", f"{kit}:/opt/kit",
        user=USER,
    )  # fmt: skip
    before = len(standin.requests())
    child = pexpect.spawn(
        argv[0], argv[1:], env=env, encoding="utf-8", timeout=240, dimensions=(40, 200)
    )
    name = ""
    try:
        source = f"{provider} from ${KEY_VARIABLE[provider]}"
        child.expect(re.escape(f"Credentials: brokered ({source})"))
        child.expect("Network mode: allowlist")
        child.expect("coi-kit: ready")
        (name,) = coi_names(client, ws)
        _only_the_standin_is_reachable(client, name, standin)

        child.sendline("go")
        child.expect(r"coi-kit: exit (\d+)")
        code = int(child.match.group(1))
        out = (ws / "out.txt").read_text(errors="replace")
        err = (ws / "err.txt").read_text(errors="replace")
        assert code == 0, f"{tool} exited {code}\n{out}\n{err[-3000:]}"
        assert standin.reply in out, f"{out}\n{err[-3000:]}"

        # The stand-in got the model call, every request with the real key in the provider's
        # header (never the placeholder, which would be refused: 401).
        got = standin.requests()[before:]
        calls = [r for r in got if MODEL_CALL[provider].match(str(r["path"]))]
        assert calls, [r["path"] for r in got]
        expected = f"Bearer {standin.key}" if provider == "openai" else standin.key
        for r in got:
            sent = r["headers"]
            assert isinstance(sent, dict)
            headers = {str(k).lower(): v for k, v in sent.items()}
            assert headers.get(KEY_HEADER[provider]) == expected, (r["path"], headers)

        # While the session is still up: the key is nowhere inside (searched as root: files,
        # every process's environment and command line) nor in the daemon's view of it.
        marker = f"marker-{os.getpid()}-{time.monotonic_ns()}"
        req = ExecRequest(["sh", "-c", 'echo "$M" > /root/m'], env={"M": marker}, user=0)
        assert client.exec.quiet(name, req) == 0
        assert credkit.find_inside(client, name, standin.key, marker) == "/root/m"
        assert standin.key not in credkit.daemon_view(client, name)

        child.expect("coi-kit: done")
        child.sendline("end")
        child.expect(pexpect.EOF, timeout=120)
    finally:
        child.close()
        remove_containers(client, ws)
    wait_gone(client, ws)
    assert standin.canary_hits() == []  # nor did the CLI reach anything but :443
    events = [
        e for e in AuditLog(name, Path(env["COI_HOME"])).read() if e["category"] == "credentials"
    ]
    forwarded = [e for e in events if e["action"] == "forwarded"]
    assert len(forwarded) >= len(calls)
    assert standin.key not in json.dumps(events)
