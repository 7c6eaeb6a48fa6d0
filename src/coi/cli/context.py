"""Shared CLI plumbing: loading config and connecting to the daemon once per command."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from coi.backend.client import IncusClient
    from coi.config.loader import Config


def load_settings(*, profile: str | None = None, cli: dict[str, Any] | None = None) -> Config:
    """The merged config for this invocation."""
    import sys

    from coi.config.loader import load_config

    cfg = load_config(cwd=Path.cwd(), env=os.environ, profile=profile, cli=cli)
    for warning in cfg.warnings:
        sys.stderr.write(f"Warning: {warning}\n")
    return cfg


def daemon() -> tuple[Config, IncusClient]:
    """This invocation's config and a client for its daemon (use the client in `with`)."""
    cfg = load_settings()
    return cfg, connect(cfg)


def connect(cfg: Config) -> IncusClient:
    """A client for the configured daemon and project."""
    from coi.backend.client import IncusClient
    from coi.cli import loaded

    remote = cfg.get_str("incus.remote") or None
    project = cfg.get_str("incus.project")
    timeout = float(cfg.get_int("incus.timeout"))
    client = IncusClient.connect(env=os.environ, remote=remote, project=project, timeout=timeout)
    loaded()
    return client
