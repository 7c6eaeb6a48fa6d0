from __future__ import annotations

from pathlib import Path

import pytest

from coi.errors import SessionError, UsageError
from coi.sessions import naming
from coi.sessions.sandbox import parse_env, sanitize_term
from coi.sessions.slots import SlotClaims
from coi.sessions.store import Metadata, SessionStore
from coi.sessions.workspace import merge_mounts, parse_mount
from coi.tools import all_tools, get_tool


def test_container_name_is_prefix_hash_slot() -> None:
    name = naming.container_name("/home/u/proj", 3, env={})
    assert name.startswith("coi-") and name.endswith("-3") and len(name) == len("coi-") + 8 + 2
    assert naming.parse_name(name, env={}) == (naming.workspace_hash("/home/u/proj"), 3)
    assert naming.container_name("/p", 1, env={"COI_CONTAINER_PREFIX": "x-"}).startswith("x-")
    assert naming.parse_name("other", env={}) is None


def test_slot_claims_never_hand_out_one_slot_twice(tmp_path: Path) -> None:
    claims = SlotClaims(tmp_path)
    first = claims.allocate("abcd1234", lambda n: False)
    # Our own claim does not block us, so ask as if the first slot's container exists.
    second = claims.allocate("abcd1234", lambda n: n == first)
    assert (first, second) == (1, 2)
    with pytest.raises(SessionError, match="all 10 slots are in use"):
        claims.allocate("abcd1234", lambda n: True)


def test_mounts_validated(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="invalid mount format"):
        parse_mount("nocolon")
    with pytest.raises(UsageError, match="must be absolute"):
        parse_mount(f"{tmp_path}:rel/path")
    with pytest.raises(UsageError, match="does not exist"):
        parse_mount(f"{tmp_path}/missing:/x")
    with pytest.raises(UsageError, match="nested mount paths"):
        merge_mounts([], [f"{tmp_path}:/workspace/sub"], "/workspace")
    mounts = merge_mounts(
        [{"host": str(tmp_path), "container": "/data"}], [f"{tmp_path}:/data:ro"], "/workspace"
    )
    assert len(mounts) == 1 and mounts[0].readonly  # the CLI mount replaced the config one


def test_env_parsing_and_term() -> None:
    assert parse_env(["A=1", "B=x=y"]) == {"A": "1", "B": "x=y"}
    # A value arrives exactly as given: commas and `=` in it are not separators.
    assert parse_env(["X=a,b=c", "Y=1,2"]) == {"X": "a,b=c", "Y": "1,2"}
    with pytest.raises(SessionError):
        parse_env(["novalue"])
    assert sanitize_term("xterm-kitty") == "xterm-256color"
    assert sanitize_term("xterm") == "xterm"


def test_resume_only_finds_this_workspace(tmp_path: Path) -> None:
    store = SessionStore(tmp_path, "claude")
    store.write_metadata(
        Metadata("s1", naming.container_name("/a", 1, env={}), False, "/a", "2026-01-01T00:00:00Z")
    )
    assert store.resolve_resume("auto", "/a").session_id == "s1"
    with pytest.raises(SessionError, match="no previous session"):
        store.resolve_resume("auto", "/b")
    with pytest.raises(SessionError, match="not found"):
        store.resolve_resume("nope", "/a")


def test_tool_registry_and_command_lines() -> None:
    assert {"claude", "opencode", "aider", "codex", "gemini"} <= set(all_tools())
    claude = get_tool("claude")
    assert claude.command(session_id="S", resume=False, bypass=True) == [
        "claude",
        "--verbose",
        "--permission-mode",
        "bypassPermissions",
        "--session-id",
        "S",
    ]
    assert claude.command(session_id="S", resume=True, bypass=False, resume_id="R") == [
        "claude",
        "--verbose",
        "--resume",
        "R",
    ]
    with pytest.raises(UsageError, match="unknown tool: vim"):
        get_tool("vim")


def test_home_file_listing_is_parsed_and_a_file_changing_midway_is_refused() -> None:
    from coi.sessions.home import UNREADABLE, _parse

    body = b'{"a": 1}\n12\n'  # content that itself looks like a size line
    out = b"-\n?\n" + str(len(body)).encode() + b"\n" + body + b"   0\n"
    assert _parse(out, ["a", "b", "c", "d"]) == [None, UNREADABLE, body, b""]
    # `wc` said 20 bytes, `cat` then gave 8: the file was written meanwhile.
    with pytest.raises(SessionError, match="changed in the container while coi read them"):
        _parse(b"20\n12345678", ["a"])
    with pytest.raises(SessionError, match="changed in the container"):
        _parse(b"3\nabcEXTRA", ["a"])
    with pytest.raises(SessionError, match="changed in the container"):
        _parse(b"-\n", ["a", "b"])
