"""Profiles (folders, inherits, built-in hardened), secret masks, the config's JSON Schema."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from coi.config import load_config
from coi.config.jsonschema import config_schema
from coi.config.loader import Config
from coi.config.profiles import describe
from coi.config.schema import SETTINGS
from coi.errors import ConfigError, UsageError
from coi.protection.masks import MAX_MASKS, devices, plan_masks


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home"
    (h / ".config" / "coi").mkdir(parents=True)
    return h


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    w = tmp_path / "ws"
    w.mkdir()
    return w


def _env(home: Path, **extra: str) -> dict[str, str]:
    return {"HOME": str(home), "COI_HOME": str(home / ".coi"), **extra}


def _profile(base: Path, name: str, text: str) -> Path:
    d = base / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.toml").write_text(text)
    return d / "config.toml"


def _load(home: Path, ws: Path, profile: str | None, **kw: Any) -> Config:
    env = _env(home, **kw.pop("env", {}))
    return load_config(cwd=ws, env=env, profile=profile, **kw)


def _own(home: Path, text: str) -> None:
    (home / ".config" / "coi" / "config.toml").write_text(text)


def test_a_user_profile_folder_inherits_another(home: Path, ws: Path) -> None:
    users = home / ".coi" / "profiles"
    base = _profile(users, "base", '[limits.memory]\nlimit = "4GiB"\n[defaults]\nimage = "b"\n')
    ci = _profile(users, "ci", 'inherits = "base"\n[defaults]\nimage = "ci-image"\n')
    cfg = _load(home, ws, "ci")
    assert cfg.profile_chain == ["base", "ci"]
    assert cfg.get_str("limits.memory.limit") == "4GiB"
    assert cfg.origins["limits.memory.limit"] == f"{base} [profile base]"
    assert cfg.get_str("defaults.image") == "ci-image"
    assert cfg.origins["defaults.image"] == f"{ci} [profile ci]"
    # Without --profile nothing of them applies.
    assert _load(home, ws, None).get_str("defaults.image") == "coi"


def test_an_inheritance_cycle_is_a_clear_error(home: Path, ws: Path) -> None:
    users = home / ".coi" / "profiles"
    _profile(users, "a", 'inherits = "b"\n')
    _profile(users, "b", 'inherits = "c"\n')
    _profile(users, "c", 'inherits = "a"\n')
    with pytest.raises(ConfigError, match=r"cycle: a -> b -> c -> a"):
        _load(home, ws, "a")
    _profile(users, "self", 'inherits = "self"\n')
    with pytest.raises(ConfigError, match=r"cycle: self -> self"):
        _load(home, ws, "self")


def test_a_missing_parent_and_an_unknown_profile_are_clear_errors(home: Path, ws: Path) -> None:
    _profile(home / ".coi" / "profiles", "a", 'inherits = "zzz"\n')
    with pytest.raises(ConfigError, match=r"profile 'a' inherits 'zzz', which is not defined"):
        _load(home, ws, "a")
    with pytest.raises(ConfigError, match=r"unknown profile 'nope'") as err:
        _load(home, ws, "nope")
    assert "hardened" in (err.value.resolution or "")


def test_a_workspace_profile_may_tighten_never_loosen(home: Path, ws: Path) -> None:
    _profile(
        ws / ".coi" / "profiles",
        "dev",
        '[network]\nmode = "open"\n[limits.memory]\nlimit = "1GiB"\n'
        '[defaults]\npersistent = true\nimage = "evil"\n',
    )
    cfg = _load(home, ws, "dev")
    assert cfg.get_str("network.mode") == "restricted"
    assert not cfg.get_bool("defaults.persistent")
    assert cfg.get_str("defaults.image") == "coi"
    assert cfg.get_str("limits.memory.limit") == "1GiB"  # tightening applies
    dropped = {d.key for d in cfg.dropped}
    assert {"network.mode", "defaults.persistent", "defaults.image"} <= dropped
    assert any("profile dev" in w and "network.mode" in w for w in cfg.warnings)
    # Trusted (COI_TRUST_ALL here; `coi trust PATH` pins one), all of it applies.
    trusted = _load(home, ws, "dev", env={"COI_TRUST_ALL": "1"})
    assert trusted.get_str("network.mode") == "open"


def test_a_workspace_profile_cannot_reach_a_looser_user_profile_through_inherits(
    home: Path, ws: Path
) -> None:
    # The user's own profile opens the network; a cloned repository names it as a parent.
    _profile(home / ".coi" / "profiles", "wide", '[network]\nmode = "open"\n')
    _profile(ws / ".coi" / "profiles", "repo", 'inherits = "wide"\n')
    cfg = _load(home, ws, "repo")
    assert cfg.profile_chain == ["wide", "repo"]
    assert cfg.get_str("network.mode") == "restricted"
    assert any(d.key == "network.mode" for d in cfg.dropped)
    # Asked for by the user themself, their profile applies in full.
    assert _load(home, ws, "wide").get_str("network.mode") == "open"


def test_an_untrusted_inherits_cannot_replace_a_trusted_one(home: Path, ws: Path) -> None:
    users = home / ".coi" / "profiles"
    _profile(users, "strict", '[network]\nmode = "allowlist"\n')
    _profile(users, "wide", '[network]\nmode = "open"\n')
    _profile(users, "work", 'inherits = "strict"\n')
    _profile(ws / ".coi" / "profiles", "work", 'inherits = "wide"\n')
    cfg = _load(home, ws, "work")
    assert cfg.profile_chain == ["strict", "work"]
    assert cfg.get_str("network.mode") == "allowlist"


def test_a_symlinked_workspace_profiles_folder_is_not_followed(
    home: Path, ws: Path, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    _profile(elsewhere, "x", '[limits.memory]\nlimit = "1GiB"\n')
    (ws / ".coi").mkdir()
    os.symlink(elsewhere, ws / ".coi" / "profiles")
    with pytest.raises(ConfigError, match="unknown profile 'x'"):
        _load(home, ws, "x")
    cfg = _load(home, ws, None)
    rows = describe(cfg, ws, _env(home))
    assert [r["name"] for r in rows] == ["hardened"]
    assert any("not read" in w for w in cfg.warnings)


def test_hardened_tightens_and_keeps_what_is_stricter(home: Path, ws: Path) -> None:
    _own(home, '[network]\nmode = "open"\n[defaults]\npersistent = true\n')
    cfg = _load(home, ws, "hardened")
    assert cfg.get_str("network.mode") == "restricted"
    assert cfg.get_bool("monitoring.enabled")
    assert not cfg.get_bool("defaults.persistent")
    assert cfg.get_bool("security.mask_secrets")
    assert cfg.get("sockets") == [] and not cfg.get_bool("ssh.forward_agent")
    _own(home, '[network]\nmode = "allowlist"\n[[sockets]]\nhost = "/run/a"\ncontainer = "/a"\n')
    cfg = _load(home, ws, "hardened")
    assert cfg.get_str("network.mode") == "allowlist"  # stricter than restricted: kept
    assert cfg.get("sockets") == []


@pytest.mark.parametrize(
    ("cli", "env"),
    [
        ({"network.mode": "open"}, {}),
        ({"defaults.persistent": True}, {}),
        ({}, {"COI_PERSISTENT": "1"}),
        ({}, {"COI_NETWORK_MODE": "open"}),
    ],
)
def test_nothing_later_loosens_hardened(
    home: Path, ws: Path, cli: dict[str, Any], env: dict[str, str]
) -> None:
    with pytest.raises(UsageError, match="loosens the built-in profile hardened"):
        _load(home, ws, "hardened", cli=cli, env=env)
    # Tightening further is fine.
    cfg = _load(home, ws, "hardened", cli={"network.mode": "allowlist"})
    assert cfg.get_str("network.mode") == "allowlist"


def test_a_profile_inheriting_hardened_keeps_its_guarantees(home: Path, ws: Path) -> None:
    _own(home, '[profiles.mine]\ninherits = "hardened"\nimage = "x"\npersistent = true\n')
    with pytest.raises(UsageError, match=r"defaults\.persistent"):
        _load(home, ws, "mine")
    _own(home, '[profiles.mine]\ninherits = "hardened"\nimage = "x"\n')
    cfg = _load(home, ws, "mine")
    assert cfg.profile_chain == ["hardened", "mine"]
    assert cfg.get_str("defaults.image") == "x" and cfg.get_bool("security.mask_secrets")


def test_table_profiles_keep_working_beside_folders(home: Path, ws: Path) -> None:
    _own(
        home,
        '[profiles.limited]\nimage = "small"\n[profiles.limited.limits.memory]\nlimit="2GiB"\n',
    )
    _profile(home / ".coi" / "profiles", "limited", '[limits.cpu]\ncount = "1"\n')
    cfg = _load(home, ws, "limited")
    assert cfg.get_str("defaults.image") == "small"
    assert cfg.get_str("limits.memory.limit") == "2GiB"
    assert cfg.get_str("limits.cpu.count") == "1"
    kinds = {r["name"]: [s["kind"] for s in r["sources"]] for r in describe(cfg, ws, _env(home))}
    assert kinds["limited"] == ["user", "table"]


# -- secret masks --------------------------------------------------------------------------

PATTERNS = [".env", ".env.*", "*.pem", "*.key", "id_*", "secrets/**"]


def test_masks_match_names_at_any_depth_and_folders_from_the_root(ws: Path) -> None:
    for rel in [".env", ".env.local", "a/b/server.pem", "k.key", "deep/id_rsa", "README", "x.py"]:
        (ws / rel).parent.mkdir(parents=True, exist_ok=True)
        (ws / rel).write_text("s")
    (ws / "secrets" / "inner").mkdir(parents=True)
    (ws / "secrets" / "inner" / "a.txt").write_text("s")
    (ws / "sub" / "secrets").mkdir(parents=True)  # `secrets/**` is anchored at the root
    (ws / ".git").mkdir()
    (ws / ".git" / "id_x").write_text("history is not masked")
    os.symlink("/etc/passwd", ws / "id_link")
    plan = plan_masks(ws, PATTERNS)
    got = {(m.rel, m.kind) for m in plan.paths}
    assert got == {
        (".env", "file"),
        (".env.local", "file"),
        ("a/b/server.pem", "file"),
        ("k.key", "file"),
        ("deep/id_rsa", "file"),
        ("secrets", "dir"),
    }
    assert any("id_link" in n and "symbolic link" in n for n in plan.notes)
    devs = devices(plan, "/workspace", ws.parent / "coihome")
    env_dev = next(d for d in devs.values() if d["path"] == "/workspace/.env")
    assert env_dev["readonly"] == "true" and Path(env_dev["source"]).read_bytes() == b""
    dir_dev = next(d for d in devs.values() if d["path"] == "/workspace/secrets")
    assert os.listdir(dir_dev["source"]) == []
    assert len(set(devs)) == len(plan.paths)


def test_too_many_matches_or_a_pattern_outside_is_refused(ws: Path) -> None:
    for i in range(MAX_MASKS + 1):
        (ws / f"{i}.pem").write_text("")
    with pytest.raises(ConfigError, match=r"match security\.secret_patterns"):
        plan_masks(ws, ["*.pem"])
    with pytest.raises(ConfigError, match="not a pattern inside the workspace"):
        plan_masks(ws, ["../x"])


# -- the JSON Schema ----------------------------------------------------------------------


def test_the_json_schema_has_every_key_with_its_type() -> None:
    schema = config_schema()
    types = {"str": "string", "bool": "boolean", "int": "integer", "float": "number"}
    for s in SETTINGS:
        node: dict[str, Any] = schema
        for part in s.key.split("."):
            node = node["properties"][part]
        assert node["default"] == s.default
        if s.kind in types and "anyOf" not in node:
            assert node["type"] == types[s.kind], s.key
    assert schema["properties"]["network"]["properties"]["mode"]["enum"] == [
        "restricted",
        "allowlist",
        "open",
    ]
    profile = schema["properties"]["profiles"]["additionalProperties"]
    assert "inherits" in profile["properties"] and "image" in profile["properties"]
    assert schema["properties"]["network"]["additionalProperties"] is False


# -- the session log and the sandbox context ------------------------------------------------


def test_a_session_log_name_is_never_a_path(tmp_path: Path) -> None:
    from coi.audit.session_log import SessionLog

    for bad in ("../x", "a/b", "..", "", "-x", "x" * 64, "coi-1\n", "a.b"):
        with pytest.raises(UsageError, match="not a container name"):
            SessionLog(bad, home=tmp_path)
    log = SessionLog("coi-abc12345-1", home=tmp_path)
    assert log.path.parent == tmp_path / "logs" / "sessions"


def test_a_session_log_appends_whole_lines_and_follow_stops_at_the_end(tmp_path: Path) -> None:
    import threading

    from coi.audit.session_log import SessionLog, follow, read

    log = SessionLog("coi-abc12345-1", home=tmp_path)
    writers = [
        threading.Thread(
            target=lambda i=i: [log.write("note", f"w{i} " + "x" * 5000) for _ in range(50)]
        )
        for i in range(4)
    ]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    records = read(log.path)
    assert len(records) == 200 and all(r["text"].endswith("x" * 5000) for r in records)
    log.write("end", "removed")
    log.write("note", "after the end")
    seen = list(follow(log.path, done=lambda r: r["event"] == "end", interval=0.01))
    assert seen[-1]["event"] == "end" and len(seen) == 201
    # A file not written any more ends when the session is said to be gone.
    other = SessionLog("coi-abc12345-2", home=tmp_path)
    other.write("start", "made")
    got = list(follow(other.path, gone=lambda: True, interval=0.01, check_every=0))
    assert [r["event"] for r in got] == ["start"]


def test_the_context_says_where_the_agent_is_and_replaces_an_earlier_one() -> None:
    from coi.network.policy import Policy
    from coi.protection.masks import Masked, MaskPlan
    from coi.sessions.context import MARK, sandbox_context, with_context
    from coi.sessions.sandbox import SandboxSpec

    spec = SandboxSpec(
        workspace=Path("/home/a/p"),
        image="coi",
        persistent=False,
        policy=Policy(mode="allowlist", entries=("registry.npmjs.org",)),
        masks=MaskPlan(Path("/home/a/p"), [Masked(".env", "file")]),
    )
    text = sandbox_context(spec, credentials="broker", published=[(3000, 3000, 100)])
    for part in (
        "`/workspace`",
        "`.env`",
        "Network: allowlist",
        "`registry.npmjs.org`",
        "3000-3099 (host 3000-3099)",
        "no host credential",
        "placeholder",
        "removed when the session ends",
        "ask the user",
    ):
        assert part in text, part
    first = with_context(b"# my own rules\n", text)
    assert first.startswith(b"# my own rules\n\n" + MARK.encode())
    again = with_context(first, "new context\n")
    assert again == b"# my own rules\n\n" + MARK.encode() + b"\nnew context\n"
    assert with_context(None, "t\n") == MARK.encode() + b"\nt\n"


def test_logs_show_the_monitors_alerts_in_time_order(tmp_path: Path) -> None:
    import time

    from coi.audit.log import AuditLog, Event
    from coi.audit.session_log import SessionLog, alert_of, follow, merged

    log = SessionLog("coi-abc12345-1", home=tmp_path)
    audit = AuditLog("coi-abc12345-1", home=tmp_path)
    # Stamped a few milliseconds apart: the order is the stamps' (the same millisecond ties).
    steps = [
        lambda: log.write("start", "made"),
        lambda: audit.write(Event("info", "monitor", "Monitoring started", "every 2 s")),
        lambda: audit.write(Event("warning", "env_scanning", "Env scan", "env | grep")),
        lambda: log.write("end", "removed"),
    ]
    for step in steps:
        step()
        time.sleep(0.003)
    sources = [(log.path, lambda r: r), (audit.path, alert_of)]
    events = [(r["event"], r["text"]) for r in merged(sources)]
    assert events == [
        ("start", "made"),
        ("alert", "WARNING Env scan: env | grep"),
        ("end", "removed"),
    ]
    followed = [
        r["event"] for r in follow(sources, done=lambda r: r["event"] == "end", interval=0.01)
    ]
    assert followed == ["start", "alert", "end"]


def test_a_workspace_cannot_loosen_hardened_by_its_own_profile_of_that_name(
    home: Path, ws: Path
) -> None:
    _profile(
        ws / ".coi" / "profiles",
        "hardened",
        '[network]\nmode = "open"\n[defaults]\npersistent = true\n'
        '[security]\nmask_secrets = false\nsecret_patterns = ["*.pem"]\n',
    )
    cfg = _load(home, ws, "hardened")
    assert cfg.get_str("network.mode") == "restricted"
    assert not cfg.get_bool("defaults.persistent") and cfg.get_bool("security.mask_secrets")
    assert ".env" in cfg.get_list("security.secret_patterns")  # may only gain entries


def test_an_inherits_in_a_workspace_table_is_untrusted_too(home: Path, ws: Path) -> None:
    _own(home, '[profiles.wide]\nimage = "open-image"\n[profiles.wide.network]\nmode = "open"\n')
    (ws / ".coi.toml").write_text('[profiles.x]\ninherits = "wide"\n')
    cfg = _load(home, ws, "x")
    assert cfg.profile_chain == ["wide", "x"]
    assert cfg.get_str("network.mode") == "restricted"
    assert cfg.get_str("defaults.image") == "coi"


def test_coi_trust_judges_a_profile_file_with_its_inherits(home: Path, ws: Path) -> None:
    from coi.config.loader import judge_file

    origin = str(ws / ".coi" / "profiles" / "dev" / "config.toml")
    dropped = judge_file({"inherits": "wide", "network": {"mode": "open"}}, origin, _env(home))
    assert {d.key for d in dropped} == {"inherits", "network.mode"}
    assert judge_file({"inherits": "hardened"}, origin, _env(home)) == []
    with pytest.raises(ConfigError, match="unknown key 'inherits'"):
        judge_file({"inherits": "wide"}, str(ws / ".coi.toml"), _env(home))
