"""From what a caller asks (flags, SDK arguments) to a sandbox spec: config, workspace, policy."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from coi.config.loader import Config, load_config
from coi.config.paths import coi_home
from coi.config.schema import NetworkMode
from coi.errors import UsageError
from coi.limits import limits_from_config
from coi.limits.spec import FLAG_KEYS
from coi.network.manager import policy_from_config
from coi.protection.paths import configured_paths, plan
from coi.sessions import aliases, forwards
from coi.sessions.environment import (
    forwarded_env,
    git_identity,
    setup_script,
    workspace_target,
    zone_for,
)
from coi.sessions.sandbox import SandboxSpec, build_spec, parse_env
from coi.sessions.workspace import check_no_credentials, merge_mounts, resolve_workspace

# Short names of the limits (`cpu`, `memory`, `duration`, ...) -> config keys: the CLI's
# `--limit-NAME` flags and the SDK's `limits={NAME: value}` use the same names.
LIMIT_NAMES: dict[str, str] = {
    flag.removeprefix("--limit-").replace("-", "_"): key for key, flag in FLAG_KEYS.items()
}


@dataclass(frozen=True)
class SessionOptions:
    """What a caller asks of one session; None (or empty) keeps what the config says."""

    workspace: str | Path | None = None
    image: str | None = None
    persistent: bool | None = None
    network: NetworkMode | None = None
    tool: str | None = None
    monitor: bool | None = None
    writable_git_hooks: bool | None = None
    # By short name (`LIMIT_NAMES`): {"memory": "2GiB", "duration": "30m"}.
    limits: Mapping[str, str | int] = field(default_factory=dict)
    mounts: tuple[str, ...] = ()  # HOST:CONTAINER[:ro]
    env: Mapping[str, str] = field(default_factory=dict)
    profile: str | None = None
    # An existing container (`--container`): coi did not make it, so it plans no protection.
    container: str | None = None
    # "run" sandboxes live as long as their coi process; "shell" ones outlive it (detach).
    kind: Literal["run", "shell"] = "shell"
    # Published as given (`--port HOST:CONTAINER`), beside the config's [ports].
    ports: tuple[str, ...] = ()
    # The name the user gives the sandbox (`--name`).
    alias: str | None = None
    # The agent works on a copy of the workspace (`--review`; coi.review).
    review: bool | None = None
    # The cluster member to make the sandbox on (`--target`; None: the scheduler chooses).
    target: str | None = None

    def overrides(self) -> dict[str, Any]:
        """The config keys these options set (None: not set)."""
        out: dict[str, Any] = {
            "defaults.image": self.image,
            "defaults.persistent": self.persistent,
            "network.mode": self.network,
            "tool.name": self.tool,
            "monitoring.enabled": self.monitor,
            "git.writable_hooks": self.writable_git_hooks,
            "workspace.mode": "review" if self.review else None,
        }
        for name, value in self.limits.items():
            if name not in LIMIT_NAMES:
                raise UsageError(
                    f"unknown limit '{name}'",
                    resolution=f"Use one of: {', '.join(LIMIT_NAMES)}.",
                )
            out[LIMIT_NAMES[name]] = value if isinstance(value, int) else str(value)
        return out


@dataclass(frozen=True)
class Prepared:
    """A session ready to be made: its config, workspace and spec, and what to tell the user
    (each line already starts with `Warning:` or `Note:`), in order."""

    config: Config
    workspace: Path
    spec: SandboxSpec
    messages: tuple[str, ...] = ()


def load(
    options: SessionOptions, *, cwd: Path | None = None, environ: Mapping[str, str] | None = None
) -> Config:
    """The config for these options: defaults < files (the workspace's own untrusted) <
    profile < COI_* environment < the options."""
    return load_config(
        cwd=cwd,
        env=os.environ if environ is None else environ,
        profile=options.profile,
        cli=options.overrides(),
    )


def prepare(
    options: SessionOptions,
    *,
    cwd: Path | None = None,
    environ: Mapping[str, str] | None = None,
    config: Config | None = None,
) -> Prepared:
    """Config, workspace and the sandbox spec for `options`; nothing is made yet. A `config`
    given was loaded (`load`) and its warnings shown by the caller.

    Everything is validated here, before any container exists: the limits, the mounts (no
    folder holding the user's keys), the environment, the network policy.

    :raises UsageError, ConfigError: bad input, with what to do about it.
    """
    environ = os.environ if environ is None else environ
    messages: list[str] = []
    if config is None:
        config = load(options, cwd=cwd, environ=environ)
        messages += [f"Warning: {w}" for w in config.warnings]
    cfg = config
    workspace = resolve_workspace(None if options.workspace is None else str(options.workspace))
    limits = limits_from_config(cfg)
    target = workspace_target(cfg, workspace)
    reviewing = cfg.get_str("workspace.mode") == "review"
    mounts = merge_mounts(cfg.get("mounts.default"), options.mounts, target)
    check_no_credentials([workspace, *(m.host for m in mounts)])
    env, unset = forwarded_env(cfg, environ)
    messages += [f"Warning: {w}" for w in unset]
    if options.kind == "run" and cfg.get_str("credentials.mode") == "none":
        # No agent credential in any sandbox: a command gets none of the providers' keys
        # either (a shell's tool is told what to keep out by `coi.credentials.plan`).
        from coi.credentials.providers import key_variables

        kept = sorted(set(env) & key_variables())
        env = {k: v for k, v in env.items() if k not in kept}
        if kept:
            messages.append(f"Note: credentials mode none: not forwarded: {', '.join(kept)}")
    sockets, notes = forwards.socket_forwards(cfg, environ)
    messages += [f"Note: {n}" for n in notes]
    env.update(forwards.ssh_env(sockets))
    explicit = parse_env([f"{k}={v}" for k, v in options.env.items()])
    host_env = tuple(k for k in env if k not in explicit)
    env.update(explicit)
    # The host's timezone, under everything the user set (defaults.environment too).
    zone = zone_for(cfg, environ)
    if zone.tz and "TZ" not in env and "TZ" not in cfg.get_table("defaults.environment"):
        env = {"TZ": zone.tz, **env}
    monitor = None
    if cfg.get_bool("monitoring.enabled"):
        from coi.monitor.monitor import Settings as MonitorSettings

        monitor = MonitorSettings.from_config(cfg, target)
    messages += [f"Note: {note}" for note in limits.notes]
    policy, warnings = policy_from_config(cfg, cache_dir=coi_home() / "network-cache")
    messages += [f"Warning: {w}" for w in warnings]
    spec = build_spec(
        cfg,
        workspace,
        mounts=mounts,
        env=env,
        kind=options.kind,
        limits=limits,
        monitor=monitor,
        policy=policy,
        # Planned on the copy in review mode (the plan makes the folders it protects).
        protection=None
        if options.container or reviewing
        else plan(workspace, configured_paths(cfg)),
        host_env=host_env,
    )
    if cfg.floors and options.container:
        raise UsageError(
            f"--container cannot be used with --profile {cfg.profile_chain[-1]}",
            details="an existing container keeps its own network, mounts and lifetime: the "
            "profile's guarantees need a sandbox coi makes",
            resolution="Drop --container, or the profile.",
        )
    if cfg.get_bool("security.mask_secrets") and options.container:
        messages.append("Warning: secrets are not masked in an existing container (--container)")
    elif cfg.get_bool("security.mask_secrets") and not reviewing:  # on the copy, below
        from dataclasses import replace

        from coi.protection.masks import plan_masks, summary

        hidden = plan_masks(workspace, cfg.get_list("security.secret_patterns"))
        messages += [f"Note: {n}" for n in [*hidden.notes, summary(hidden)]]
        spec = replace(spec, masks=hidden)
    ports = forwards.port_request(cfg, options.ports)
    if options.container and (ports or sockets or options.alias):
        messages.append(
            "Warning: an existing container (--container) gets no published ports, "
            "forwarded sockets or --name; 'coi alias NAME CONTAINER' names it"
        )
        ports, sockets = forwards.PortRequest(), ()
    spec = dataclasses.replace(
        spec,
        ports=ports,
        sockets=sockets,
        alias=aliases.check(options.alias) if options.alias and not options.container else "",
        target=options.target or "",
    )
    # At each start, as root inside: the timezone's files and the agent's git identity
    # (not in a container coi did not make).
    git = None if options.container else git_identity(cfg, environ)
    spec = dataclasses.replace(
        spec, setup=setup_script(zone, git), drop_root=not cfg.get_bool("security.agent_root")
    )
    if reviewing:
        spec = _in_review(cfg, options, spec, messages)
    return Prepared(cfg, workspace, spec, tuple(messages))


def _in_review(
    cfg: Config, options: SessionOptions, spec: SandboxSpec, messages: list[str]
) -> SandboxSpec:
    """The sandbox gets a copy of the workspace (coi.review), made last: nothing before it
    can refuse the session and leave the copy behind. Protection and masks are planned on
    the copy, which is what the agent sees.

    :raises UsageError: with --container (a container coi did not make for the folder).
    """
    if options.container:
        raise UsageError(
            "review mode needs a sandbox coi makes for the folder (not --container)",
            resolution="Drop --review (or [workspace] mode), or --container.",
        )
    from coi.review import copy as review_copy
    from coi.review.cp import terminal_progress
    from coi.review.pool import store_for

    review = review_copy.start(
        spec.workspace,
        store=store_for(cfg),
        progress=terminal_progress(f"Copying {spec.workspace} for the review"),
    )
    source = Path(review.work)
    messages.append(
        f"Note: review {review.id}: the agent works on a copy; {spec.workspace} is not touched "
        f"until 'coi apply {review.id}' ('coi diff {review.id}' shows the changes)"
    )
    masks = None
    if cfg.get_bool("security.mask_secrets"):
        from coi.protection.masks import plan_masks, summary

        masks = plan_masks(source, cfg.get_list("security.secret_patterns"))
        messages += [f"Note: {n}" for n in [*masks.notes, summary(masks)]]
    protection = plan(source, configured_paths(cfg))
    return dataclasses.replace(
        spec, source=source, review=review.id, protection=protection, masks=masks
    )
