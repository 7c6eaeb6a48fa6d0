"""Resource and time limits: validated from config and flags, applied as daemon config."""

from coi.limits.spec import FLAG_KEYS, Limits, limits_from_config
from coi.units import parse_duration

__all__ = ["FLAG_KEYS", "Limits", "limits_from_config", "parse_duration"]
