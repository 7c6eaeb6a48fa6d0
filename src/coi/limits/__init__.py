"""Resource and time limits: validated from config and flags, applied as daemon config."""

from coi.config.units import parse_duration
from coi.limits.spec import FLAG_KEYS, Limits, limits_from_config

__all__ = ["FLAG_KEYS", "Limits", "limits_from_config", "parse_duration"]
