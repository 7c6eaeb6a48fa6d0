"""Configuration: TOML layers, profiles and environment, every key declared once."""

from coi.config.loader import Config, config_files, load_config
from coi.config.paths import coi_home, expand

__all__ = ["Config", "coi_home", "config_files", "expand", "load_config"]
