"""The default `coi build` runs the script shipped inside coi, never one from the current
folder or workspace; only `coi build custom --script PATH` names another."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace
from unittest.mock import MagicMock

import pytest
from click.testing import CliRunner

import coi.images
from coi.cli.build_cmd import _options, build_cmd
from coi.images.builder import Builder, BuildOptions, packaged_script
from coi.images.buildlog import BuildLog

EVIL = b"#!/bin/sh\necho planted by the agent\n"


def _plant(folder: Path) -> None:
    """What an agent could leave in a workspace hoping `coi build` picks it up."""
    for rel in [
        "coi-image.sh",
        "scripts/coi-image.sh",
        "images/scripts/coi-image.sh",
        "coi/images/scripts/coi-image.sh",
        "src/coi/images/scripts/coi-image.sh",
        ".coi/coi-image.sh",
    ]:
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(EVIL)
    (folder / ".coi.toml").write_text(
        '[build]\nmirror = "http://evil.example/debian"\nimage_server = "https://evil.example"\n'
        'base = "server"\ntools = ["evil"]\n'
    )


def test_the_packaged_script_is_the_one_inside_coi() -> None:
    shipped = Path(coi.images.__file__).parent / "scripts" / "coi-image.sh"
    assert packaged_script() == shipped.read_bytes()
    assert b"planted" not in packaged_script()


def test_default_build_pushes_the_packaged_script_whatever_the_current_folder_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    _plant(ws)
    monkeypatch.chdir(ws)
    client = MagicMock()
    client.images.exists.return_value = False
    client.images.publish.return_value = "fp"
    client.exec.run.return_value = SimpleNamespace(exit_code=0)
    log = BuildLog(tmp_path / "build.log", out=io.StringIO())
    builder = Builder(client, log)
    monkeypatch.setattr(builder, "resolve_base", lambda opts: {"type": "image", "alias": "b"})
    try:
        res = builder.build_coi(BuildOptions(host_ca_certificates=False))
    finally:
        log.close()
    assert not res.skipped and res.fingerprint == "fp"
    (call,) = client.files.push_bytes.call_args_list
    assert call.args[1:] == ("/root/coi-build.sh", packaged_script())


def test_the_workspace_config_does_not_steer_the_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    _plant(ws)
    monkeypatch.chdir(ws)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    for var in ["COI_CONFIG", "COI_TRUST_ALL"]:
        monkeypatch.delenv(var, raising=False)
    from coi.cli.context import load_settings

    opts = _options(load_settings(), "coi", False)
    defaults = BuildOptions()
    assert opts.mirror == defaults.mirror
    assert opts.image_server == "" and opts.base == "auto"
    assert "evil" not in opts.tools


def test_a_custom_script_only_by_an_explicit_flag(tmp_path: Path) -> None:
    res = CliRunner().invoke(build_cmd, ["custom", "my-img"])
    assert res.exit_code == 2 and "--script" in res.output
