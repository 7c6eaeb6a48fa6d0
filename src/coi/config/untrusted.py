"""Judge a value from an untrusted workspace file: does it only tighten what is in force?

The agent writes the workspace, and a cloned repository brings its own `.coi.toml`: neither
is the user's word. So a value from such a file applies only when it is at least as strict
as the value already in force (from the built-in defaults and the user's own files); each
key declares in the schema how that is decided (`Setting.trust`, see `TRUST_RULES`).
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import re
from dataclasses import dataclass
from typing import Any

from coi.config.schema import Setting
from coi.units import parse_bytes, parse_duration


@dataclass(frozen=True)
class Dropped:
    """A value an untrusted file asked for and did not get."""

    key: str
    value: Any
    file: str
    reason: str

    def line(self) -> str:
        return f"{self.key} = {json.dumps(self.value)} ({self.reason})"


@dataclass(frozen=True)
class _Q:
    """A measured limit: `value` in `dim` units; `inf` means no limit."""

    value: float
    dim: str = ""


_NONE = _Q(math.inf)


def _bytes(text: str) -> float:
    return float(parse_bytes(text))


def _host_memory() -> float:
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _cpus(text: str) -> _Q:
    if text.isdigit():
        return _Q(float(int(text)))
    cpus: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return _Q(float(len(cpus)))


def _allowance(text: str) -> _Q:
    if m := re.fullmatch(r"(\d+)%", text):
        return _Q(int(m.group(1)) / 100, "share")
    if m := re.fullmatch(r"(\d+)ms/(\d+)ms", text):
        return _Q(int(m.group(1)) / int(m.group(2)), "cap")
    raise ValueError(text)


def _memory(text: str) -> _Q:
    if m := re.fullmatch(r"(\d+)%", text):
        return _Q(int(m.group(1)) / 100 * _host_memory())
    return _Q(_bytes(text))


def _swap(text: str) -> _Q:
    if text.lower() == "true":
        return _NONE
    if text.lower() == "false":
        return _Q(0.0)
    return _Q(_bytes(text))


def _rate(text: str) -> _Q:
    if m := re.fullmatch(r"(\d+)iops", text):
        return _Q(float(m.group(1)), "iops")
    if text.endswith("/s"):
        return _Q(_bytes(text[:-2]), "bytes/s")
    raise ValueError(text)


def _size(text: str) -> _Q:
    return _Q(_bytes(text)) if text != "0" else _NONE


def _duration(text: str) -> _Q:
    return _Q(parse_duration(text))


def _number(value: Any) -> _Q:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(value)
    return _Q(float(value)) if value else _NONE


_MEASURES = {
    "cpus": _cpus,
    "allowance": _allowance,
    "memory": _memory,
    "swap": _swap,
    "rate": _rate,
    "duration": _duration,
    "size": _size,
}


def _limit(s: Setting, value: Any) -> _Q:
    """A "lower" value measured; '' and 0 are no limit.

    :raises ValueError: a value coi cannot read.
    """
    if value in ("", None):
        return _NONE
    if not s.measure:
        return _number(value)
    return _MEASURES[s.measure](str(value).strip())


def _at_most(new: _Q, cur: _Q) -> bool:
    """Is `new` at least as tight as `cur`? A hard CPU cap may replace a share, not back."""
    if cur.value == math.inf:
        return True
    if new.dim != cur.dim and not (new.dim == "cap" and cur.dim == "share"):
        return False
    return new.value <= cur.value


def _norm(items: list[Any]) -> set[str]:
    return {str(x).strip().lower().rstrip("/") for x in items}


def _outside(entries: list[Any]) -> str:
    """The first entry that is not a path inside the workspace ('' when all are)."""
    for e in entries:
        rel = posixpath.normpath(str(e).strip())
        if not str(e).strip() or str(e).startswith("/") or rel == "." or rel.startswith("../"):
            return str(e)
        if rel == "..":
            return str(e)
    return ""


def _lower(s: Setting, new: Any, cur: Any) -> str | None:
    try:
        n = _limit(s, new)
    except (ValueError, KeyError):
        return "not a value coi can compare with the one in force"
    try:
        c = _limit(s, cur)
    except (ValueError, KeyError):
        return None  # what is in force is malformed (and refused later): anything is tighter
    if n.value == math.inf:
        return "removes a limit"
    return None if _at_most(n, c) else "raises a limit"


def _number_rule(s: Setting, new: Any, cur: Any) -> str | None:
    if isinstance(new, bool) or not isinstance(new, (int, float)):
        return "not a number"
    if s.trust == "smaller":
        return None if new <= cur else "raises it"
    # "higher": 0 means no cap, the strictest
    n = math.inf if new == 0 else new
    c = math.inf if cur == 0 else cur
    return None if n >= c else "lowers it"


def _list_rule(s: Setting, new: Any, cur: Any) -> str | None:
    if s.trust == "subset":
        extra = sorted(_norm(new) - _norm(cur))
        return f"allows more: {', '.join(extra)}" if extra else None
    missing = sorted(_norm(cur) - _norm(new))
    return f"stops protecting {', '.join(missing)}" if missing else None


def judge(s: Setting, new: Any, cur: Any) -> str | None:
    """Why `new` (from an untrusted file) may not replace `cur`; None when it may.

    `new` is already coerced to the key's type. For keys whose lists are appended
    (`Setting.append`), `cur` is what is in force and `new` is what the file adds.
    """
    rule = s.trust or "never"
    if rule == "any":
        return None
    if s.measure == "workspace-paths" and (bad := _outside(new)):
        return f"names a path outside the workspace: {bad}"
    if s.append:
        if not new:
            return None
        return None if rule == "superset" else "an untrusted file may not add these"
    if new == cur:
        return None
    if rule == "never":
        return "an untrusted file may not set this"
    if rule in ("true", "false"):
        safe = rule == "true"
        return None if new is safe else f"turns off a safety switch (safe: {str(safe).lower()})"
    if rule == "order":
        if new not in s.order or cur not in s.order:
            return "not one of " + ", ".join(s.order)
        if s.order.index(new) > s.order.index(cur):
            return None
        return f"less strict than {json.dumps(cur)} in force; strictness: {' < '.join(s.order)}"
    if rule == "lower":
        return _lower(s, new, cur)
    if rule in ("smaller", "higher"):
        return _number_rule(s, new, cur)
    if rule in ("subset", "superset"):
        return _list_rule(s, new, cur)
    return "an untrusted file may not set this"
