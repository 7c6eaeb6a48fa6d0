"""Validate `[limits]` and `--limit-*` values and turn them into instance config and devices."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from coi.config.loader import Config
from coi.errors import UsageError
from coi.units import parse_duration

# config key -> the flag that sets it (errors name whichever the user wrote).
FLAG_KEYS: dict[str, str] = {
    "limits.cpu.count": "--limit-cpu",
    "limits.cpu.allowance": "--limit-cpu-allowance",
    "limits.cpu.priority": "--limit-cpu-priority",
    "limits.memory.limit": "--limit-memory",
    "limits.memory.swap": "--limit-memory-swap",
    "limits.memory.enforce": "--limit-memory-enforce",
    "limits.disk.read": "--limit-disk-read",
    "limits.disk.write": "--limit-disk-write",
    "limits.disk.max": "--limit-disk-max",
    "limits.disk.priority": "--limit-disk-priority",
    "limits.disk.tmpfs_size": "--limit-tmpfs",
    "limits.runtime.max_processes": "--limit-processes",
    "limits.runtime.max_duration": "--limit-duration",
}

_CPU = re.compile(r"\d+(-\d+)?(,\d+(-\d+)?)*")
_ALLOWANCE = re.compile(r"(\d+)%|(\d+)ms/(\d+)ms")
_SIZE = re.compile(r"\d+[KMGT]i?B")
_RATE = re.compile(r"(\d+[KMGT]i?B)/s|\d+iops")


@dataclass
class Limits:
    """Validated limits: instance config keys, root-disk keys, /tmp size, duration."""

    config: dict[str, str] = field(default_factory=dict)
    root_disk: dict[str, str] = field(default_factory=dict)
    tmpfs_size: str = ""
    max_duration: float = 0.0
    duration_text: str = ""
    auto_stop: bool = True
    stop_graceful: bool = True
    notes: list[str] = field(default_factory=list)

    @property
    def any(self) -> bool:
        return bool(self.config or self.root_disk or self.tmpfs_size or self.max_duration)

    def raw_lxc(self) -> str:
        """The /tmp tmpfs as an LXC mount entry (the daemon has no tmpfs device type)."""
        if not self.tmpfs_size:
            return ""
        size = self.tmpfs_size.replace("iB", "").replace("B", "").lower()
        return f"lxc.mount.entry = tmpfs tmp tmpfs rw,nosuid,nodev,size={size},mode=1777 0 0"

    def summary(self) -> str:
        parts = [f"{k}={v}" for k, v in {**self.config, **self.root_disk}.items()]
        if self.tmpfs_size:
            parts.append(f"/tmp={self.tmpfs_size}")
        if self.duration_text:
            parts.append(f"max_duration={self.duration_text}")
        return ", ".join(parts)


def _bad(cfg: Config, key: str, value: object, expected: str) -> UsageError:
    origin = cfg.origins.get(key, "default")
    where = FLAG_KEYS.get(key, key) if origin == "command line" else f"{key} (from {origin})"
    return UsageError(
        f"invalid {where} '{value}': expected {expected}",
        resolution=f"Fix the value, or leave {where} unset for no limit.",
    )


def _text(cfg: Config, key: str) -> str:
    return str(cfg.get(key) or "").strip()


def _cpu(cfg: Config, out: Limits) -> None:
    if cpu := _text(cfg, "limits.cpu.count"):
        if not _CPU.fullmatch(cpu):
            raise _bad(cfg, "limits.cpu.count", cpu, "a count (2), a range (0-3) or a list (0,2)")
        out.config["limits.cpu"] = cpu
    if allowance := _text(cfg, "limits.cpu.allowance"):
        m = _ALLOWANCE.fullmatch(allowance)
        if not m or (m.group(1) and not 0 < int(m.group(1)) <= 100):
            raise _bad(cfg, "limits.cpu.allowance", allowance, "50% (a share) or 25ms/100ms")
        out.config["limits.cpu.allowance"] = allowance
        if m.group(1):
            out.notes.append(
                f"CPU allowance {allowance} is a share under contention, not a cap; "
                "use the Xms/Yms form for a hard cap"
            )


def _priorities(cfg: Config, out: Limits) -> None:
    for key in ("limits.cpu.priority", "limits.disk.priority"):
        prio = cfg.get(key)
        if prio in ("", None, 0):
            continue
        if not isinstance(prio, int) or not 0 <= prio <= 10:
            raise _bad(cfg, key, prio, "a number from 0 to 10")
        out.config[key] = str(prio)


def _memory(cfg: Config, out: Limits) -> None:
    if memory := _text(cfg, "limits.memory.limit"):
        m = re.fullmatch(r"(\d+)%", memory)
        if not (_SIZE.fullmatch(memory) or (m and 0 < int(m.group(1)) <= 100)):
            raise _bad(cfg, "limits.memory.limit", memory, "a size like 2GiB or 512MiB, or 50%")
        out.config["limits.memory"] = memory
        enforce = _text(cfg, "limits.memory.enforce")
        if enforce not in ("hard", "soft"):
            raise _bad(cfg, "limits.memory.enforce", enforce, "hard or soft")
        out.config["limits.memory.enforce"] = enforce
    swap = _text(cfg, "limits.memory.swap")
    if swap and swap.lower() != "true":
        if swap.lower() != "false" and not _SIZE.fullmatch(swap):
            raise _bad(cfg, "limits.memory.swap", swap, "true, false or a size like 1GiB")
        out.config["limits.memory.swap"] = swap.lower() if swap.lower() == "false" else swap


def _disk(cfg: Config, out: Limits) -> None:
    for key, dev in (
        ("limits.disk.read", "limits.read"),
        ("limits.disk.write", "limits.write"),
        ("limits.disk.max", "limits.max"),
    ):
        if rate := _text(cfg, key):
            m = _RATE.fullmatch(rate)
            if not m:
                raise _bad(cfg, key, rate, "a rate like 10MB/s or 1000iops")
            out.root_disk[dev] = m.group(1) or rate  # the daemon wants 10MB, not 10MB/s
    if tmpfs := _text(cfg, "limits.disk.tmpfs_size"):
        if not _SIZE.fullmatch(tmpfs):
            raise _bad(cfg, "limits.disk.tmpfs_size", tmpfs, "a size like 4GiB")
        out.tmpfs_size = tmpfs


def _runtime(cfg: Config, out: Limits) -> None:
    key = "limits.runtime.max_processes"
    procs = cfg.get(key)
    if procs not in ("", None, 0):
        if not isinstance(procs, int) or procs < 0:
            raise _bad(cfg, key, procs, "a whole number, 0 for none")
        if procs < 10:
            raise _bad(cfg, key, procs, "at least 10 (init and a shell need some)")
        out.config["limits.processes"] = str(procs)
    if duration := _text(cfg, "limits.runtime.max_duration"):
        try:
            out.max_duration = parse_duration(duration)
        except ValueError:
            raise _bad(
                cfg, "limits.runtime.max_duration", duration, "a duration like 30s, 2h or 1h30m"
            ) from None
        out.duration_text = duration


def limits_from_config(cfg: Config) -> Limits:
    """Every non-empty limit, validated.

    :raises UsageError: a value has the wrong form (the message names the flag or key).
    """
    out = Limits(
        auto_stop=cfg.get_bool("limits.runtime.auto_stop"),
        stop_graceful=cfg.get_bool("limits.runtime.stop_graceful"),
    )
    for part in (_cpu, _priorities, _memory, _disk, _runtime):
        part(cfg, out)
    return out


def check_server(limits: Limits, server_kind: str) -> None:
    """Refuse what this daemon cannot do, before anything is created."""
    swap = limits.config.get("limits.memory.swap", "")
    if swap not in ("", "true", "false") and server_kind != "incus":
        raise UsageError(
            f"a swap size ({swap}) needs Incus; this daemon ({server_kind}) takes true or false",
            resolution="Use --limit-memory-swap=false to forbid swap, or true to allow it.",
        )
