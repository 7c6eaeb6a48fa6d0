"""Pure logic behind the lifecycle commands and settings injection."""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path

import pytest

from coi.cli.file_cmds import split_remote
from coi.cli.render import check_format, human_size, parse_time
from coi.errors import UsageError
from coi.images.versions import is_version_of, plan_cleanup, version_alias
from coi.sessions.slots import stale_claims
from coi.tools.registry import get_tool
from coi.tools.settings import deep_merge, merge_json_text


def test_deep_merge_keeps_the_users_nested_keys() -> None:
    user = {"env": {"CLAUDE_CODE_USE_BEDROCK": "1", "AWS_REGION": "eu-west-1"}, "model": "x"}
    ours = {"env": {"CLAUDE_CODE_EFFORT_LEVEL": "medium"}, "permissions": {"defaultMode": "b"}}
    assert deep_merge(user, ours) == {
        "env": {
            "CLAUDE_CODE_USE_BEDROCK": "1",
            "AWS_REGION": "eu-west-1",
            "CLAUDE_CODE_EFFORT_LEVEL": "medium",
        },
        "model": "x",
        "permissions": {"defaultMode": "b"},
    }
    assert user["env"] == {"CLAUDE_CODE_USE_BEDROCK": "1", "AWS_REGION": "eu-west-1"}


def test_merge_json_text_never_clobbers_a_file_it_cannot_read() -> None:
    assert merge_json_text(b"{not json", {"a": 1}) is None
    assert merge_json_text(b"[1, 2]", {"a": 1}) is None
    assert json.loads(merge_json_text(None, {"a": 1}) or b"") == {"a": 1}
    assert json.loads(merge_json_text(b"  \n", {"a": 1}) or b"") == {"a": 1}
    assert json.loads(merge_json_text(b'{"b": 2}', {"a": 1}) or b"") == {"a": 1, "b": 2}


def test_claude_sandbox_settings_follow_permission_mode_and_effort() -> None:
    claude = get_tool("claude")
    bypass = claude.sandbox_settings(bypass=True, options={"effort_level": "high"})
    settings = bypass[".claude/settings.json"]
    assert settings["permissions"] == {"defaultMode": "bypassPermissions"}
    assert settings["env"] == {"CLAUDE_CODE_EFFORT_LEVEL": "high"}
    assert bypass[".claude.json"]["bypassPermissionsModeAccepted"] is True
    asking = claude.sandbox_settings(bypass=False, options={})
    assert "permissions" not in asking[".claude/settings.json"]
    assert asking[".claude/settings.json"]["effortLevel"] == "medium"
    opencode = get_tool("opencode").sandbox_settings(bypass=False, options={})
    assert opencode == {".config/opencode/opencode.json": {"permission": {"*": "ask"}}}


def test_image_versions_keep_the_newest() -> None:
    alias = version_alias("coi-", datetime(2026, 11, 26, 17, 45, 1))
    assert alias == "coi-20261126-174501" and is_version_of(alias, "coi-")
    assert not is_version_of("coi", "coi-") and not is_version_of("coi-tiny", "coi-")
    aliases = ["coi-20260101-000000", "coi-20260301-000000", "coi-20260201-000000", "coi"]
    res = plan_cleanup(aliases, "coi-", 2)
    assert res.kept == ["coi-20260301-000000", "coi-20260201-000000"]
    assert res.deleted == ["coi-20260101-000000"]
    with pytest.raises(UsageError, match="--keep must be > 0"):
        plan_cleanup(aliases, "coi-", 0)


def test_remote_paths_and_formats() -> None:
    assert split_remote("box:/a/../b/./c", "source") == ("box", "/b/c")
    for bad in ("nocolon", ":/x", "box:"):
        with pytest.raises(UsageError, match="must be in format 'container:path'"):
            split_remote(bad, "source")
    with pytest.raises(UsageError, match="must be absolute"):
        split_remote("box:rel", "source")
    with pytest.raises(UsageError, match="invalid format 'x': must be 'text' or 'json'"):
        check_format("x", ("text", "json"))


def test_sizes_and_daemon_times() -> None:
    assert human_size(512) == "512 B"
    assert human_size(12.3 * 1024) == "12.3 KB"
    assert human_size(5 * 1024**3) == "5.0 GB"
    t = parse_time("2026-11-26T17:54:53.357642665Z")
    assert t is not None and t.utcoffset() is not None
    assert parse_time("0001-01-01T00:00:00Z") is None


def test_stale_claims_are_those_of_dead_processes(tmp_path: Path) -> None:
    (tmp_path / "aaaa0000-1.claim").write_text(f"{os.getpid()}\n")
    (tmp_path / "aaaa0000-2.claim").write_text("999999999\n")
    (tmp_path / "aaaa0000-3.claim").write_text("garbage")
    assert [p.name for p in stale_claims(tmp_path)] == ["aaaa0000-2.claim", "aaaa0000-3.claim"]


def test_list_json_gives_an_empty_string_for_a_container_without_an_address() -> None:
    from coi.cli.lifecycle_cmds import _container_json
    from coi.sessions.inventory import ContainerInfo

    stopped = ContainerInfo(
        "coi-abc-1", "Stopped", "2026-12-06T08:00:00Z", "coi", True, None, "/w", "shell", "h", 1
    )
    assert _container_json(stopped)["ipv4"] == ""
