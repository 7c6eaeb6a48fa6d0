"""Every config key the code reads is one the schema defines (a typo would read a default)."""

from __future__ import annotations

import ast

from tests.conftest import ROOT

from coi.config.schema import BY_KEY

# Config's typed readers (no other class in coi has these names), and plain `cfg.get(...)`.
TYPED = {"get_str", "get_bool", "get_int", "get_float", "get_list", "get_table"}
SECTIONS = {key.split(".")[0] for key in BY_KEY}


def _read_keys() -> dict[str, str]:
    """key -> the first file reading it, for calls like `cfg.get_str("network.mode")`."""
    out: dict[str, str] = {}
    for f in (ROOT / "src" / "coi").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                continue
            key, method = node.args[0].value, node.func.attr
            receiver = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
            plain = method == "get" and receiver == "cfg" and key.split(".")[0] in SECTIONS
            if method in TYPED or plain:
                out.setdefault(key, str(f.relative_to(ROOT)))
    return out


def test_the_scan_finds_the_readers() -> None:
    keys = _read_keys()
    assert "network.mode" in keys and "incus.code_uid" in keys  # the scan itself works
    assert len(keys) > 40


def test_every_key_read_is_in_the_schema() -> None:
    unknown = {k: f for k, f in _read_keys().items() if k not in BY_KEY}
    assert unknown == {}
