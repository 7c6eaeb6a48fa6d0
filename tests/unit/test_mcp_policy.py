"""What an MCP client may ask of `coi mcp` (coi.mcp.policy): network, limits, the root."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import ROOT

from coi.config.loader import Config, load_config
from coi.errors import UsageError
from coi.mcp.policy import (
    NETWORK_ORDER,
    check_network,
    check_root,
    inside_root,
    limit_refusals,
    limits_overrides,
    network_refusal,
)


def _config(
    tmp_path: Path, user: str = "", workspace: str = "", cli: dict[str, Any] | None = None
) -> Config:
    """The user's file (text `user`) and the workspace's untrusted ./.coi.toml."""
    ws = tmp_path / "ws"
    ws.mkdir(exist_ok=True)
    own = tmp_path / "user.toml"
    own.write_text(user)
    if workspace:
        (ws / ".coi.toml").write_text(workspace)
    env = {"HOME": str(tmp_path), "COI_HOME": str(tmp_path / ".coi")}
    return load_config(cwd=ws, env=env, files=[own, ws / ".coi.toml"], cli=cli)


# -- the network ----------------------------------------------------------------------------


def test_network_order_is_the_schemas_loosest_first() -> None:
    assert NETWORK_ORDER == ("open", "restricted", "allowlist")


@pytest.mark.parametrize(
    ("requested", "configured", "allowed"),
    [
        (None, "restricted", True),  # not asking keeps the config's
        ("restricted", "restricted", True),
        ("allowlist", "restricted", True),  # stricter
        ("open", "restricted", False),  # looser
        ("open", "allowlist", False),
        ("restricted", "allowlist", False),
        ("open", "open", True),
        ("restricted", "open", True),
        ("allowlist", "open", True),
        ("allowlist", "allowlist", True),
    ],
)
def test_a_client_may_tighten_the_network_never_loosen_it(
    requested: str | None, configured: str, allowed: bool
) -> None:
    assert (network_refusal(requested, configured, False) is None) is allowed
    # The user's switch lets a client loosen it, all the way to open.
    assert network_refusal(requested, configured, True) is None


def test_an_unknown_mode_is_refused_whatever_the_switch() -> None:
    assert "unknown network mode" in (network_refusal("wide", "restricted", True) or "")


def test_open_is_refused_by_default_and_says_how_to_allow_it(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as err:
        check_network("open", _config(tmp_path))
    assert "looser than 'restricted'" in err.value.message
    assert "allow_open_network" in (err.value.resolution or "")
    check_network("allowlist", _config(tmp_path))  # stricter: fine


def test_the_users_config_allows_open(tmp_path: Path) -> None:
    check_network("open", _config(tmp_path, "[mcp]\nallow_open_network = true\n"))
    check_network("open", _config(tmp_path, '[network]\nmode = "open"\n'))


def test_a_workspace_file_cannot_allow_open(tmp_path: Path) -> None:
    """`mcp.allow_open_network` is trust="never": an agent that writes .coi.toml cannot
    give the next client an open network."""
    cfg = _config(tmp_path, workspace="[mcp]\nallow_open_network = true\n")
    assert cfg.get_bool("mcp.allow_open_network") is False
    assert any(d.key == "mcp.allow_open_network" for d in cfg.dropped)
    with pytest.raises(UsageError):
        check_network("open", cfg)


# -- limits ---------------------------------------------------------------------------------


def test_limits_by_short_name_and_unknown_ones(tmp_path: Path) -> None:
    assert limits_overrides({"memory": "2GiB", "processes": 100}) == {
        "limits.memory.limit": "2GiB",
        "limits.runtime.max_processes": 100,
    }
    with pytest.raises(UsageError, match="unknown limit 'ram'"):
        limits_overrides({"ram": "1GiB"})


def test_a_client_may_lower_limits_not_raise_or_remove_them(tmp_path: Path) -> None:
    user = '[limits.memory]\nlimit = "2GiB"\n[limits.runtime]\nmax_duration = "1h"\n'
    config = _config(tmp_path, user)

    def refused(**limits: str | int) -> list[str]:
        overrides = limits_overrides(limits)
        asked = _config(tmp_path, user, cli=overrides)
        return limit_refusals(asked, config, list(overrides))

    assert refused(memory="1GiB", duration="30m") == []
    assert refused(processes=200) == []  # none set: any is a limit
    [why] = refused(memory="4GiB")
    assert "limits.memory.limit" in why and "raises a limit" in why
    [why] = refused(duration="0")
    assert "limits.runtime.max_duration" in why


# -- the root -------------------------------------------------------------------------------


def test_workspaces_inside_the_root_only(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "a" / "b").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    assert inside_root(root, ".") == root.resolve()
    assert inside_root(root, "a/b") == (root / "a" / "b").resolve()
    assert inside_root(root, str(root / "a")) == (root / "a").resolve()
    for bad in ("..", "../outside", str(tmp_path / "outside"), "/etc", "/", "a/../../outside"):
        with pytest.raises(UsageError, match="outside the server's root"):
            inside_root(root, bad)


def test_a_symlink_out_of_the_root_is_refused(tmp_path: Path) -> None:
    """What counts is where the folder really is: a link inside the root to /etc (which an
    agent in another sandbox could plant) does not take a client there."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "etc").symlink_to("/etc")
    (root / "real").mkdir()
    (root / "alias").symlink_to(root / "real")
    with pytest.raises(UsageError, match="outside") as err:
        inside_root(root, "etc")
    assert err.value.details == "it is /etc"
    assert inside_root(root, "alias") == (root / "real").resolve()  # the real path is used


def test_a_root_that_is_a_prefix_of_a_sibling_is_not_fooled(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src-other").mkdir()
    with pytest.raises(UsageError):
        inside_root(tmp_path / "src", str(tmp_path / "src-other"))


def test_a_missing_workspace_or_root_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not a folder"):
        inside_root(tmp_path, "nope")
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match="not a folder"):
        inside_root(tmp_path, "file")
    with pytest.raises(UsageError, match="not a folder"):
        check_root(tmp_path / "nope")
    assert check_root(tmp_path) == tmp_path.resolve()


# -- the command line pays nothing for it ---------------------------------------------------


def test_importing_coi_mcp_and_the_cli_loads_no_mcp_library() -> None:
    code = (
        "import sys, coi.mcp, coi.mcp.policy, coi.cli.app, coi.cli.mcp_cmd; "
        "print(sorted(m for m in sys.modules if m == 'mcp' or m.startswith('mcp.')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "[]"


# -- progress messages ----------------------------------------------------------------------


def test_progress_messages_keep_characters_whole_and_mark_stderr() -> None:
    from coi.mcp.server import MAX_NOTE, _Notes
    from coi.sdk import Output

    notes = _Notes()
    e = "é".encode()
    assert notes.message([Output("stdout", b"caf" + e[:1])]) == "caf"
    assert notes.message([Output("stdout", e[1:] + b"\n"), Output("stderr", b"oops\n")]) == (
        "é\n[stderr] oops\n"
    )
    long = notes.message([Output("stdout", b"x" * (MAX_NOTE * 2))])
    assert len(long) < MAX_NOTE + 100 and "characters left out" in long
