"""Merging coi's sandbox settings into a tool's own JSON (or TOML) settings without losing
the user's."""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping
from typing import Any


def deep_merge(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `overlay` laid over it: nested objects merge key by key, the rest is replaced."""
    out = dict(base)
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def merge_json_text(existing: bytes | None, overlay: Mapping[str, Any]) -> bytes | None:
    """The merged file content, or None when the existing file is not a JSON object.

    A file coi cannot read as an object is left alone: overwriting it would throw away
    settings the user chose (Bedrock, proxies, models).
    """
    base: Any = {}
    if existing is not None and existing.strip():
        try:
            base = json.loads(existing)
        except ValueError:
            return None
        if not isinstance(base, dict):
            return None
    return (json.dumps(deep_merge(base, overlay), indent=2) + "\n").encode()


def _toml_value(value: Any) -> str | None:
    """`value` as a TOML value (JSON's string escapes are TOML's), or None: not a scalar."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | str):
        return json.dumps(value)
    return None


def merge_toml_text(existing: bytes | None, overlay: Mapping[str, Any]) -> bytes | None:
    """The TOML file with `overlay`'s top-level keys set (scalars only: codex's
    `openai_base_url`), everything else kept as written; None when the existing file is not
    TOML, or the overlay is not top-level scalars (left alone, as for JSON).

    The keys are put first, before any table, replacing the same top-level keys; the result
    is parsed again, so a file this cannot edit is never written broken.
    """
    text = ""
    if existing is not None and existing.strip():
        try:
            text = existing.decode()
            tomllib.loads(text)
        except (UnicodeDecodeError, tomllib.TOMLDecodeError):
            return None
    head: list[str] = []
    for key, value in overlay.items():
        shown = _toml_value(value)
        if shown is None or not re.fullmatch(r"[A-Za-z0-9_-]+", key):
            return None
        head.append(f"{key} = {shown}")
    lines = text.splitlines()
    out: list[str] = []
    in_table = False
    for line in lines:
        if re.match(r"\s*\[", line):
            in_table = True
        name = re.match(r"\s*([A-Za-z0-9_-]+)\s*=", line)
        if not in_table and name and name.group(1) in overlay:
            continue  # replaced by the overlay's value
        out.append(line)
    merged = "\n".join(head + out) + "\n"
    try:
        got = tomllib.loads(merged)
    except tomllib.TOMLDecodeError:
        return None
    if any(got.get(k) != v for k, v in overlay.items()):
        return None  # e.g. the old value spanned lines: not this function's to edit
    return merged.encode()


def merge_settings_text(
    rel: str, existing: bytes | None, overlay: Mapping[str, Any]
) -> bytes | None:
    """`merge_toml_text` for a `.toml` file, `merge_json_text` for any other."""
    if rel.endswith(".toml"):
        return merge_toml_text(existing, overlay)
    return merge_json_text(existing, overlay)
