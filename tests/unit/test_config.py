from __future__ import annotations

from pathlib import Path

import pytest

from coi.config import load_config
from coi.errors import ConfigError


def _load(tmp_path: Path, text: str = "", **kw):  # type: ignore[no-untyped-def]
    f = tmp_path / "c.toml"
    f.write_text(text)
    return load_config(cwd=tmp_path, env=kw.pop("env", {}), files=[f], **kw)


def test_defaults_match_upstream(tmp_path: Path) -> None:
    cfg = load_config(cwd=tmp_path, env={}, files=[])
    assert cfg.get_str("defaults.image") == "coi"
    assert cfg.get_str("network.mode") == "restricted"
    # Upstream's four first; then coi's own config and more of git's host-side files.
    assert cfg.get_list("security.protected_paths")[:4] == [
        ".git/hooks",
        ".git/config",
        ".husky",
        ".vscode",
    ]
    assert cfg.origins["defaults.image"] == "default"


def test_layers_apply_in_order_with_origins(tmp_path: Path) -> None:
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text('[defaults]\nimage = "one"\n[[mounts.default]]\nhost = "/x"\ncontainer = "/x"\n')
    b.write_text('[defaults]\nimage = "two"\n[[mounts.default]]\nhost = "/y"\ncontainer = "/y"\n')
    cfg = load_config(
        cwd=tmp_path, env={"COI_LIMIT_CPU": "2"}, files=[a, b], cli={"network.mode": "open"}
    )
    assert cfg.get_str("defaults.image") == "two" and cfg.origins["defaults.image"] == str(b)
    assert [m["host"] for m in cfg.get("mounts.default")] == ["/x", "/y"]  # appended
    assert cfg.get_str("limits.cpu.count") == "2"
    assert cfg.origins["limits.cpu.count"] == "env COI_LIMIT_CPU"
    assert cfg.origins["network.mode"] == "command line"


def test_unknown_key_names_file_key_and_suggestion(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, "[network]\nmod = 'open'\n")
    assert "network.mod" in err.value.message and "c.toml" in err.value.message
    assert "network.mode" in (err.value.resolution or "")


def test_wrong_type_and_bad_choice_are_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="must be true or false"):
        _load(tmp_path, "[defaults]\npersistent = 'maybe'\n")
    with pytest.raises(ConfigError, match="one of restricted, allowlist, open"):
        _load(tmp_path, "[network]\nmode = 'wide'\n")


def test_syntax_error_says_failed_to_load(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="failed to load config"):
        _load(tmp_path, "[defaults\n")


def test_profiles(tmp_path: Path) -> None:
    text = (
        '[profiles.limited]\nimage = "small"\npersistent = true\n'
        '[profiles.limited.limits.memory]\nlimit = "2GiB"\n'
    )
    cfg = _load(tmp_path, text, profile="limited")
    assert cfg.get_str("defaults.image") == "small" and cfg.get_bool("defaults.persistent")
    assert cfg.get_str("limits.memory.limit") == "2GiB"
    with pytest.raises(ConfigError, match="unknown profile 'nope'"):
        _load(tmp_path, text, profile="nope")
