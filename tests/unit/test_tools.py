"""A tool is one file in coi/tools/builtin/: found by scanning the package, installed in the
image from the recipe in that file (the build script names no tool), and the config's list of
tools to build comes from the registry."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.conftest import ROOT

import coi.tools.builtin
from coi.config.schema import BY_KEY
from coi.errors import UsageError
from coi.images.builder import BuildOptions, packaged_script, tool_env
from coi.tools import registry
from coi.tools.base import Install, Tool

BUILTIN_DIR = Path(coi.tools.builtin.__file__).parent
SCRIPT = packaged_script().decode()
TODAYS_IMAGE = {"claude", "opencode", "codex", "gemini", "aider"}


def _module_names() -> set[str]:
    return {p.stem for p in BUILTIN_DIR.glob("*.py") if not p.name.startswith("_")}


@pytest.fixture
def fresh_registry() -> Iterator[None]:
    registry.builtin_tools.cache_clear()
    registry.all_tools.cache_clear()
    yield
    registry.builtin_tools.cache_clear()
    registry.all_tools.cache_clear()


# -- discovery ---------------------------------------------------------------------------------


def test_every_builtin_tool_is_discovered_under_its_file_name() -> None:
    tools = registry.builtin_tools()
    assert set(tools) == _module_names()
    assert TODAYS_IMAGE | {"pi"} <= set(tools)
    for name, tool in tools.items():
        assert tool.name == name and name.isidentifier()
        assert registry.get_tool(name) is tool
        assert tool.install is not None, f"{name}: coi build could not install it"


def test_a_tool_file_dropped_into_a_package_is_found(tmp_path: Path) -> None:
    pkg = tmp_path / "more_tools"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "newtool.py").write_text(
        "from coi.tools.base import Install, Tool\n"
        'TOOL = Tool(name="newtool", binary="nt", install=Install(npm="newtool-cli"))\n'
    )
    (pkg / "helpers.py").write_text("X = 1\n")  # no TOOL: not a tool
    (pkg / "_private.py").write_text("raise RuntimeError('never imported')\n")
    sys.path.insert(0, str(tmp_path))
    try:
        tools = registry.discover("more_tools")
    finally:
        sys.path.remove(str(tmp_path))
        for mod in [m for m in sys.modules if m.split(".")[0] == "more_tools"]:
            del sys.modules[mod]
    assert list(tools) == ["newtool"]
    assert tools["newtool"].binary == "nt"


def test_a_new_file_in_the_builtin_package_is_a_tool_everywhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_registry: None
) -> None:
    """What adding a tool is: one file. (Laid in a second folder of the package's path.)"""
    (tmp_path / "dropin.py").write_text(
        "from coi.tools.base import Install, Tool\n"
        'TOOL = Tool(name="dropin", binary="dropin", '
        'install=Install(script="echo made > /usr/local/bin/dropin", default=False))\n'
    )
    monkeypatch.setattr(coi.tools.builtin, "__path__", [*coi.tools.builtin.__path__, str(tmp_path)])
    try:
        assert "dropin" in registry.builtin_tools()
        assert registry.get_tool("dropin").binary == "dropin"
        assert "dropin" not in registry.default_build_tools()
        env = tool_env(BuildOptions(tools=["default", "dropin"]))
        assert env["COI_TOOLS"].split()[-1] == "dropin"
        assert json.loads(env["COI_TOOL_RECIPES"])["dropin"] == {
            "kind": "script",
            "script": "echo made > /usr/local/bin/dropin",
            "binary": "dropin",
        }
    finally:
        sys.modules.pop("coi.tools.builtin.dropin", None)


def test_get_tool_imports_one_module_and_config_loading_none() -> None:
    """The cheap path of every session: no package scan, no entry points, no other tool."""
    code = textwrap.dedent(
        """
        import sys
        from pathlib import Path
        from coi.config.loader import load_config
        load_config(cwd=Path("/"), env={}, files=[])
        after_config = sorted(m for m in sys.modules if m.startswith("coi.tools"))
        from coi.tools.registry import get_tool
        get_tool("pi")
        print(after_config)
        print(sorted(m for m in sys.modules if m.startswith("coi.tools.builtin.")))
        print("pkgutil" in sys.modules, "importlib.metadata" in sys.modules)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out == ["[]", "['coi.tools.builtin.pi']", "False False"]


def test_names_that_are_not_modules_are_unknown_tools() -> None:
    for name in ["vim", "a.b", "../claude", "_private", "__init__", ""]:
        with pytest.raises(UsageError, match="unknown tool"):
            registry.get_tool(name)


def test_install_takes_exactly_one_way() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        Install()
    with pytest.raises(ValueError, match="exactly one"):
        Install(npm="a", pypi="b")
    assert Install(pypi="aider-chat").recipe("aider") == {
        "kind": "pypi",
        "package": "aider-chat",
        "binary": "aider",
    }


# -- what the build script is given -------------------------------------------------------------


def test_the_recipes_cover_every_tool() -> None:
    every = list(registry.builtin_tools())
    env = tool_env(BuildOptions(tools=every))
    assert env["COI_TOOLS"].split() == every
    recipes = json.loads(env["COI_TOOL_RECIPES"])
    assert set(recipes) == set(every)
    for name, recipe in recipes.items():
        tool = registry.get_tool(name)
        assert recipe["binary"] == tool.binary
        assert recipe["kind"] in {"npm", "pypi", "script"}
        assert recipe.get("package") or recipe.get("script")


def test_the_default_build_is_todays_image_and_pi_only_when_asked() -> None:
    env = tool_env(BuildOptions())  # tools=[] and [build] tools = ["default"] alike
    assert set(env["COI_TOOLS"].split()) == TODAYS_IMAGE
    assert env["COI_REQUIRED_TOOL"] == "claude"
    assert set(json.loads(env["COI_TOOL_RECIPES"])) == TODAYS_IMAGE
    assert tool_env(BuildOptions(tools=["default"])) == env
    assert json.loads(env["COI_TOOL_RECIPES"])["aider"]["kind"] == "pypi"
    assert json.loads(env["COI_TOOL_RECIPES"])["claude"] == {
        "kind": "npm",
        "package": "@anthropic-ai/claude-code",
        "binary": "claude",
    }
    pi = json.loads(tool_env(BuildOptions(tools=["default", "pi"]))["COI_TOOL_RECIPES"])["pi"]
    assert pi == {"kind": "npm", "package": "@mariozechner/pi-coding-agent", "binary": "pi"}
    # The configured tool goes in even when [build] tools does not name it.
    only = tool_env(BuildOptions(tools=["opencode"], required_tool="pi"))
    assert only["COI_TOOLS"] == "opencode pi" and only["COI_REQUIRED_TOOL"] == "pi"


def test_names_coi_cannot_install_reach_the_script_to_be_reported() -> None:
    env = tool_env(BuildOptions(tools=["claude", "evil"], required_tool="nosuchtool"))
    assert env["COI_TOOLS"] == "claude evil"  # an unknown required tool is not added
    assert set(json.loads(env["COI_TOOL_RECIPES"])) == {"claude"}


def test_the_schema_list_of_tools_comes_from_the_registry() -> None:
    setting = BY_KEY["build.tools"]
    assert setting.default == [registry.DEFAULT_BUILD]
    assert registry.build_tools(setting.default) == registry.default_build_tools()
    assert registry.default_build_tools() == [
        n for n, t in registry.builtin_tools().items() if t.install and t.install.default
    ]
    assert set(registry.default_build_tools()) == TODAYS_IMAGE


# -- the build script ----------------------------------------------------------------------------


def test_the_build_script_parses() -> None:
    res = subprocess.run(["bash", "-n", "-c", SCRIPT], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_the_build_script_names_no_tool() -> None:
    for name, tool in registry.builtin_tools().items():
        assert tool.install is not None
        for word in [tool.install.npm, tool.install.pypi]:
            assert not word or word not in SCRIPT, (name, word)
        assert not re.search(rf"^\s*{name}\)", SCRIPT, re.M), f"a case for {name}"
        assert not re.search(rf"\b{name}_tool\b", SCRIPT), f"a function for {name}"


def _tool_section() -> str:
    """The script's agent-CLI part, and its last lines (the required tool's verdict)."""
    start = SCRIPT.index("recipe() {")
    end = SCRIPT.index('step "Cleaning up"')
    verdict = SCRIPT.index('for f in "${failed[@]}"; do')
    return SCRIPT[start:end] + SCRIPT[verdict:]


@pytest.mark.skipif(shutil.which("jq") is None, reason="the build script reads recipes with jq")
@pytest.mark.parametrize("required", ["claude", "broken"])
def test_the_script_installs_what_the_recipes_say(tmp_path: Path, required: str) -> None:
    """The tool part of the script, run with stand-ins for npm and uv that 'install' a binary
    printing a version: the real recipes of every tool, plus one of each way to fail."""
    bin_dir, opt = tmp_path / "bin", tmp_path / "opt"
    bin_dir.mkdir()
    recipes = json.loads(
        tool_env(BuildOptions(tools=list(registry.builtin_tools())))["COI_TOOL_RECIPES"]
    )
    recipes["broken"] = {"kind": "npm", "package": "no-such-package", "binary": "broken"}
    made = bin_dir / "made"
    recipes["made"] = {
        "kind": "script",
        "script": f"printf '#!/bin/sh\\necho made 0.1\\n' > {made}; chmod +x {made}",
        "binary": "made",
    }
    binaries = {r["package"]: r["binary"] for r in recipes.values() if "package" in r}
    (tmp_path / "map.json").write_text(json.dumps(binaries))
    fake_install = (
        "#!/bin/bash\n"
        'pkg="${@: -1}"\n'
        f'bin="$(jq -r --arg p "$pkg" \'.[$p] // empty\' {tmp_path}/map.json)"\n'
        '[ "$pkg" != no-such-package ] || { echo "404 $pkg"; exit 1; }\n'
        f'printf \'#!/bin/sh\\necho "%s 9.9.9"\\n\' "$bin" > {bin_dir}/$bin\n'
        f"chmod +x {bin_dir}/$bin\n"
    )
    npm = bin_dir / "npm"
    npm.write_text('#!/bin/bash\n[ "$1" = config ] && exit 0\n' + fake_install.split("\n", 1)[1])
    (opt / "uv" / "bin").mkdir(parents=True)
    uv = opt / "uv" / "bin" / "uv"
    uv.write_text(fake_install)
    for f in (npm, uv):
        f.chmod(0o755)
    tools = [*recipes, "ghost"]
    body = _tool_section().replace("/opt/coi", str(opt)).replace("/tmp/v", str(tmp_path / "v"))
    script = (
        "set -euo pipefail\n"
        'step() { echo "==> $*"; }\n'
        "CA_BUNDLE=/dev/null NPM_REGISTRY=http://registry.invalid\n"
        f"TOOLS={shlex.quote(' '.join(tools))} REQUIRED={required}\n"
        f"RECIPES={shlex.quote(json.dumps(recipes))}\n" + body
    )
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    res = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env)
    lines = [line for line in res.stdout.splitlines() if line.startswith("==> ")]
    assert lines[0] == f"==> Installing agent CLIs: {' '.join(tools)}"
    for name in registry.builtin_tools():
        assert f"==> tool {name}: ok {recipes[name]['binary']} 9.9.9" in lines
    assert "==> tool made: ok made 0.1" in lines
    assert "==> tool broken: FAILED (npm package no-such-package)" in lines
    assert "==> tool ghost: FAILED (coi does not know how to install it)" in lines
    if required == "broken":
        assert res.returncode == 3
        assert lines[-1] == "==> the default tool 'broken' failed to install"
    else:
        assert res.returncode == 0, res.stdout + res.stderr


def test_tool_plugins_still_come_from_entry_points(
    monkeypatch: pytest.MonkeyPatch, fresh_registry: None
) -> None:
    plugin = Tool(name="plug", binary="plug")
    shadow = Tool(name="claude", binary="not-claude")

    class EP:
        def __init__(self, obj: Tool) -> None:
            self.obj = obj

        def load(self) -> Tool:
            return self.obj

    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [EP(plugin), EP(shadow)])
    assert registry.get_tool("plug") is plugin
    assert registry.get_tool("claude").binary == "claude"  # built-ins win
    assert registry.all_tools()["claude"].binary == "claude"
    # A plugin without an install recipe is left to the image: nothing to pass the script.
    assert registry.install_recipes(["plug"]) == {}
    assert registry.build_tools([], "plug") == registry.default_build_tools()


def test_the_docs_show_pi_s_real_file() -> None:
    doc = (ROOT / "docs" / "tools.md").read_text()
    shown = doc.split("```python\n", 1)[1].split("```", 1)[0]
    assert shown == (BUILTIN_DIR / "pi.py").read_text()
