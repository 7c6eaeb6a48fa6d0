"""coi: run AI coding agents in isolated Incus system containers."""

__version__ = "0.1.0"
PROJECT_URL = "https://github.com/mensfeld/code-on-incus"
