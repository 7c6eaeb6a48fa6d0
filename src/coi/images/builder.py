"""`coi build`: a base image becomes the `coi` image (or a custom one) in a build container."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from coi import checkpoint, helpers, labels
from coi.backend.client import IncusClient
from coi.backend.exec import ExecRequest
from coi.backend.models import JSON
from coi.errors import BackendError, UsageError
from coi.images import base as base_images
from coi.images.buildlog import BuildLog
from coi.images.versions import version_alias
from coi.tools import registry

COI_DESCRIPTION = "coi image (agent CLIs, Node.js, Python, Docker, GitHub CLI, tmux)"
HOST_CA_DIR = Path("/usr/local/share/ca-certificates")
_PROGRESS = "==> "
BUILD_PREFIX = "coi-build-"  # the build containers' names (the keeper knows them too)


def packaged_script() -> bytes:
    """The build script shipped inside coi (`coi/images/scripts/coi-image.sh`).

    The default build never reads a script or image definition from the current folder or
    a workspace: the agent can write there, and the image runs every later session. Only an
    explicit `coi build custom NAME --script PATH` runs a script of the user's choosing.
    """
    return resources.files("coi.images").joinpath("scripts/coi-image.sh").read_bytes()


@dataclass
class BuildOptions:
    """What to build and from where (from flags and the [build] config)."""

    alias: str = "coi"
    force: bool = False
    base: str = "auto"
    image_server: str = ""
    image_server_alias: str = "debian/12"
    mirror: str = "http://deb.debian.org/debian"
    host_ca_certificates: bool = True
    # `[build] tools`: tool names; "default" (or an empty list) stands for the built-in tools
    # marked for the default image. The required tool is installed in any case.
    tools: list[str] = field(default_factory=list)
    required_tool: str = "claude"
    pool: str = "coi"
    network: str = "coibr0"
    remote: str | None = None  # the daemon's remote name (None: the local one)


@dataclass
class BuildResult:
    """What a build made (or why it made nothing)."""

    alias: str
    skipped: bool
    fingerprint: str = ""
    version: str = ""
    tools: dict[str, str] = field(default_factory=dict)  # name -> "ok <version>" / "FAILED ..."


def tool_env(opts: BuildOptions) -> dict[str, str]:
    """What the build script is told about the agent CLIs: which to install (COI_TOOLS), which
    one must not fail (COI_REQUIRED_TOOL), and how to install each (COI_TOOL_RECIPES: JSON,
    tool name -> `Install.recipe()`, from each tool's file in coi/tools/builtin/ or a plugin).
    A name without a recipe is reported by the script as one coi cannot install."""
    tools = registry.build_tools(opts.tools, opts.required_tool)
    return {
        "COI_TOOLS": " ".join(tools),
        "COI_REQUIRED_TOOL": opts.required_tool,
        "COI_TOOL_RECIPES": json.dumps(registry.install_recipes(tools), separators=(",", ":")),
    }


class _Progress:
    """Turns the build script's output into log lines and user-visible progress."""

    def __init__(self, log: BuildLog) -> None:
        self.log = log
        self.buf = b""
        self.tools: dict[str, str] = {}

    def __call__(self, data: bytes) -> None:
        self.log.output(data)
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        for raw in lines:
            line = raw.decode(errors="replace").rstrip("\r")
            if line.startswith(_PROGRESS):
                msg = line[len(_PROGRESS) :]
                if msg.startswith("tool ") and ": " in msg:
                    name, status = msg[5:].split(": ", 1)
                    self.tools[name] = status
                if not self.log.verbose:
                    self.log.say("  " + msg)


class Builder:
    """Builds images in a throw-away container that is removed on every exit path."""

    def __init__(self, client: IncusClient, log: BuildLog) -> None:
        self.client = client
        self.log = log

    # -- the base -----------------------------------------------------------------------

    def resolve_base(self, opts: BuildOptions) -> JSON:
        """The `source` of the build container: a local image or the image server."""
        choice = base_images.choose_base(
            opts.base,
            server=opts.image_server,
            server_alias=opts.image_server_alias,
            mirror=opts.mirror,
            local_exists=self.client.images.exists,
            server_answers=base_images.server_answers,
        )
        self.log.say(f"Base: {choice.kind} {choice.source} ({choice.reason})")
        if choice.kind == "server":
            return {
                "type": "image",
                "mode": "pull",
                "server": opts.image_server,
                "protocol": "simplestreams",
                "alias": opts.image_server_alias,
            }
        if choice.kind == "debootstrap":
            with self.log.step(f"Bootstrapping Debian 12 from {opts.mirror} (cached afterwards)"):
                base_images.build_debootstrap_base(self.client, opts.mirror, self.log)
            return {"type": "image", "alias": base_images.BASE_ALIAS}
        return {"type": "image", "alias": choice.source}

    # -- builds ---------------------------------------------------------------------------

    def build_coi(self, opts: BuildOptions) -> BuildResult:
        """The `coi` image: base + coi-image.sh, published as a version, then aliased."""
        if self.client.images.exists(opts.alias) and not opts.force:
            return BuildResult(alias=opts.alias, skipped=True)
        version = version_alias(f"{opts.alias}-")
        self.log.say(f"Building image '{opts.alias}' as version '{version}'")
        source = self.resolve_base(opts)
        script = packaged_script()
        env = {"COI_MIRROR": opts.mirror, **tool_env(opts)}
        progress = _Progress(self.log)

        def name_it(fp: str) -> None:
            with self.log.step(f"Pointing '{opts.alias}' at {version}"):
                self.client.images.set_alias(opts.alias, fp)

        fp = self._build(opts, source, script, env, progress, version, COI_DESCRIPTION, name_it)
        return BuildResult(opts.alias, False, fp, version, progress.tools)

    def build_custom(self, opts: BuildOptions, script: Path, base: str) -> BuildResult:
        """A user script run as root on `base`, published as `opts.alias`."""
        if not script.is_file():
            raise UsageError(f"build script not found: {script}")
        old = self.client.images.alias_target(opts.alias)
        if old and not opts.force:
            return BuildResult(alias=opts.alias, skipped=True, fingerprint=old)
        if not self.client.images.exists(base):
            raise UsageError(
                f"base image '{base}' not found",
                resolution="Build it first ('coi build'), or pass --base with an existing image.",
            )
        self.log.say(f"Building custom image '{opts.alias}' from '{base}' with {script}")
        progress = _Progress(self.log)

        def name_it(fp: str) -> None:
            with self.log.step(f"Pointing '{opts.alias}' at the new image"):
                self.client.images.set_alias(opts.alias, fp)
                if old and old != fp and not self._aliased_elsewhere(old, opts.alias):
                    self.client.images.delete(old)

        fp = self._build(
            opts,
            {"type": "image", "alias": base},
            script.read_bytes(),
            {},
            progress,
            None,
            f"Custom image: {opts.alias}",
            name_it,
        )
        return BuildResult(opts.alias, False, fp, "", progress.tools)

    def _aliased_elsewhere(self, fingerprint: str, alias: str) -> bool:
        img = self.client.images.get(fingerprint)
        return any(a != alias for a in img.aliases)

    def _build(
        self,
        opts: BuildOptions,
        source: JSON,
        script: bytes,
        env: dict[str, str],
        progress: _Progress,
        version: str | None,
        description: str,
        name_it: Callable[[str], None],
    ) -> str:
        """Build in a container of its own, publish, and name the image (`name_it`) while the
        keeper still watches: killed before the name is given, nothing nameless is left."""
        name = f"{BUILD_PREFIX}{secrets.token_hex(3)}"
        drop_orphans(self.client)
        # Should this coi die (kill -9, a lost terminal), the keeper ends the build container
        # (a publish the daemon has under way fails with it: measured on Incus 6.0, the
        # publish task names no instance and leaves no image) and an image left unnamed: a
        # build script must not run on unwatched, nor a nameless image stay behind.
        keeper = helpers.keeper(name, project=self.client.project, remote=opts.remote)
        try:
            checkpoint.step("build-keeper-started")
            with self.log.step(f"Starting build container {name}"):
                self._launch(name, source, opts)
            checkpoint.step("build-container-made")
            self._run_script(name, script, env, progress, opts)
            with self.log.step("Stopping the build container"):
                try:
                    self.client.instances.stop(name, timeout=30)
                except BackendError:
                    self.client.instances.stop(name, force=True)
            checkpoint.step("build-stopped")
            label = version or opts.alias
            with self.log.step(f"Publishing image {label}"):
                fp = self.client.images.publish(
                    instance=name,
                    aliases=(version,) if version else (),
                    properties={
                        "description": description,
                        "os": "debian",
                        "release": "12",
                        BUILT_FROM: name,
                    },
                )
            self.log.note(f"fingerprint {fp}")
            checkpoint.step("build-published")  # published; not named yet
            name_it(fp)
            return fp
        finally:
            self.log.note(f"removing build container {name}")
            try:
                self.client.instances.delete(name, force=True)
            except BackendError as err:
                self.log.say(f"Warning: could not remove build container {name}: {err}")
            helpers.dismiss(keeper)

    def _launch(self, name: str, source: JSON, opts: BuildOptions) -> None:
        self.client.instances.create(
            name,
            image="",
            source=source,
            config={
                "security.nesting": "true",
                # A build cut by a power loss is not started again by the daemon.
                "boot.autostart": "false",
                **labels.owner_config("build"),
            },
            devices={
                "root": {"type": "disk", "path": "/", "pool": opts.pool},
                "eth0": {"type": "nic", "network": opts.network, "name": "eth0"},
            },
            start=True,
            description="coi image build",
        )
        # Boot finishes (or degrades) before the script runs; bounded by `timeout`.
        self.client.exec.run(
            name,
            ExecRequest(["timeout", "120", "systemctl", "is-system-running", "--wait"]),
            on_stdout=self.log.output,
            on_stderr=self.log.output,
        )

    def _run_script(
        self,
        name: str,
        script: bytes,
        env: dict[str, str],
        progress: _Progress,
        opts: BuildOptions,
    ) -> None:
        with self.log.step("Copying the build script and CA certificates"):
            crts = sorted(HOST_CA_DIR.glob("*.crt")) if opts.host_ca_certificates else []
            if crts:
                # A custom base may not have the folder (a minimal image): made first.
                self.client.files.mkdir(name, str(HOST_CA_DIR), parents=True)
                for crt in crts:
                    self.client.files.push_file(name, crt, f"{HOST_CA_DIR}/{crt.name}", mode=0o644)
                    self.log.note(f"CA certificate {crt.name}")
            self.client.files.push_bytes(name, "/root/coi-build.sh", script, mode=0o755)
        with self.log.step("Running the build script"):
            res = self.client.exec.run(
                name,
                ExecRequest(
                    ["bash", "/root/coi-build.sh"],
                    env={
                        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                        "HOME": "/root",
                        "LANG": "C.UTF-8",
                        **env,
                    },
                    cwd="/root",
                ),
                on_stdout=progress,
                on_stderr=progress,
            )
            if res.exit_code != 0:
                raise self.log.failed(f"the build script exited with {res.exit_code}")


# The image property naming the build container an image was published from: an image that
# has it, no alias and no such container any more is what a killed `coi build` left.
BUILT_FROM = "coi.built_from"


def orphans(client: IncusClient, *, container: str | None = None) -> list[str]:
    """Fingerprints of images a killed build published and never named (of `container`'s
    build only, if given): no alias, and their build container is gone."""
    images = [
        i
        for i in client.images.list()
        if not i.aliases
        and i.properties.get(BUILT_FROM)
        and (container is None or i.properties.get(BUILT_FROM) == container)
    ]
    if not images:
        return []
    names = set(client.instances.names())
    return [i.fingerprint for i in images if i.properties[BUILT_FROM] not in names]


def drop_orphans(client: IncusClient, *, container: str | None = None) -> list[str]:
    """Delete what `orphans` finds; the fingerprints deleted."""
    gone = []
    for fp in orphans(client, container=container):
        try:
            client.images.delete(fp)
            gone.append(fp)
        except BackendError:
            pass  # in use (a container made from it meanwhile): kept
    return gone
