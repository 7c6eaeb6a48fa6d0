"""Merging coi's sandbox settings into a tool's own JSON settings without losing the user's."""

from __future__ import annotations

import json
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
