"""The JSON Schema of coi's config files, generated from `config/schema.py` (`coi schema config`).

Editors with a TOML language server (Taplo, Even Better TOML) validate `config.toml` with it.
It is made from the same `SETTINGS` the loader reads, so it cannot drift from what coi accepts.
"""

from __future__ import annotations

from typing import Any

from coi.config.schema import PROFILE_KEYS, SETTINGS, TRUST_RULES, Setting

SCHEMA_URI = "https://json-schema.org/draft/2020-12/schema"
_MOUNTS: dict[str, Any] = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {"host": {}, "container": {}},
        "required": ["host", "container"],
        "additionalProperties": False,
    },
}


def _leaf(s: Setting) -> dict[str, Any]:
    out: dict[str, Any]
    if s.kind == "str":
        out = {"type": "string"}
        if s.choices:
            out["enum"] = [c for c in s.choices if c not in ("true", "false")]
            if "true" in s.choices:  # a key that grew from a switch still takes one
                out = {"anyOf": [out, {"type": "boolean"}]}
    elif s.kind == "bool":
        out = {"type": "boolean"}
    elif s.kind == "int":
        out = {"type": "integer"}
    elif s.kind == "float":
        out = {"type": "number"}
    elif s.kind == "list":
        out = {"type": "array", "items": {"type": "string"}}
    elif s.kind == "table":
        out = {"type": "object", "additionalProperties": {"type": "string"}}
    else:
        out = dict(_MOUNTS)
    out["description"] = s.help
    out["default"] = s.default
    rule = s.trust or "never"
    out["x-coi-untrusted"] = f"{rule}: {TRUST_RULES.get(rule, '')}"
    if s.env:
        out["x-coi-env"] = list(s.env)
    return out


def _tree(items: list[tuple[str, Setting]]) -> dict[str, Any]:
    root: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}
    for key, s in items:
        node = root
        parts = key.split(".")
        for part in parts[:-1]:
            node = node["properties"].setdefault(
                part, {"type": "object", "properties": {}, "additionalProperties": False}
            )
        node["properties"][parts[-1]] = _leaf(s)
    return root


def config_schema() -> dict[str, Any]:
    """The schema of `config.toml` (and of a profile's `config.toml`, which may add
    `inherits`)."""
    root = _tree([(s.key, s) for s in SETTINGS])
    profile = _tree(sorted(PROFILE_KEYS.items()))
    profile["properties"]["inherits"] = {
        "type": "string",
        "description": "A profile applied before this one.",
    }
    root["properties"]["profiles"] = {
        "type": "object",
        "description": "Named profiles ([profiles.NAME]), applied with --profile NAME.",
        "additionalProperties": profile,
    }
    root["properties"]["inherits"] = {
        "type": "string",
        "description": "Only in a profile's own file (.coi/profiles/NAME/config.toml or "
        "~/.coi/profiles/NAME/config.toml): the profile applied before this one.",
    }
    return {
        "$schema": SCHEMA_URI,
        "$id": "coi-config",
        "title": "coi config.toml",
        **root,
    }
