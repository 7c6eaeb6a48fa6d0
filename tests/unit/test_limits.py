"""Limit values: validation that names the flag or key, and what reaches the daemon."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from coi.config.loader import load_config
from coi.errors import UsageError
from coi.limits.spec import check_server, limits_from_config
from coi.units import parse_duration


def limits(tmp_path: Path, cli: dict[str, Any] | None = None, toml: str = "") -> Any:
    files = []
    if toml:
        f = tmp_path / "config.toml"
        f.write_text(toml)
        files.append(f)
    return limits_from_config(load_config(cwd=tmp_path, env={}, files=files, cli=cli))


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("5s", 5), ("2h", 7200), ("1h30m", 5400), ("1.5h", 5400), ("500ms", 0.5), ("90m", 5400)],
)
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "soon", "-5s", "0s", "5 s", "1d"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_nothing_set_is_no_limit(tmp_path: Path) -> None:
    lim = limits(tmp_path)
    assert not lim.any and lim.config == {} and lim.raw_lxc() == ""


def test_values_reach_the_daemon_keys(tmp_path: Path) -> None:
    lim = limits(
        tmp_path,
        {
            "limits.cpu.count": "0-1",
            "limits.cpu.allowance": "25ms/100ms",
            "limits.cpu.priority": 3,
            "limits.memory.limit": "512MiB",
            "limits.memory.swap": "false",
            "limits.disk.read": "10MB/s",
            "limits.disk.write": "200iops",
            "limits.disk.tmpfs_size": "1GiB",
            "limits.runtime.max_processes": 500,
            "limits.runtime.max_duration": "1h30m",
        },
    )
    assert lim.config == {
        "limits.cpu": "0-1",
        "limits.cpu.allowance": "25ms/100ms",
        "limits.cpu.priority": "3",
        "limits.memory": "512MiB",
        "limits.memory.enforce": "hard",  # a memory limit is a cap unless asked otherwise
        "limits.memory.swap": "false",
        "limits.processes": "500",
    }
    assert lim.root_disk == {"limits.read": "10MB", "limits.write": "200iops"}
    assert (
        lim.raw_lxc() == "lxc.mount.entry = tmpfs tmp tmpfs rw,nosuid,nodev,size=1g,mode=1777 0 0"
    )
    assert lim.max_duration == 5400 and lim.duration_text == "1h30m"
    assert lim.notes == []


def test_percentage_allowance_is_said_to_be_a_share(tmp_path: Path) -> None:
    lim = limits(tmp_path, {"limits.cpu.allowance": "50%"})
    assert "not a cap" in lim.notes[0]


def test_errors_name_the_flag_or_the_config_key(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="invalid --limit-memory '2GB!'"):
        limits(tmp_path, {"limits.memory.limit": "2GB!"})
    with pytest.raises(UsageError) as err:
        limits(tmp_path, toml='[limits.runtime]\nmax_duration = "forever"\n')
    assert "invalid limits.runtime.max_duration (from " in err.value.message
    assert "config.toml" in err.value.message and "'forever'" in err.value.message
    with pytest.raises(UsageError, match=r"invalid limits\.cpu\.priority"):
        limits(tmp_path, toml="[limits.cpu]\npriority = 11\n")


def test_swap_size_only_on_incus(tmp_path: Path) -> None:
    lim = limits(tmp_path, {"limits.memory.swap": "1GiB"})
    check_server(lim, "incus")
    with pytest.raises(UsageError, match="needs Incus"):
        check_server(lim, "lxd")
