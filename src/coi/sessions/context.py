"""The sandbox context: a short text telling the agent where it is (`tool.sandbox_context`).

Upstream writes a SANDBOX_CONTEXT.md and adds it to the tool's instructions. coi does the
same, in the agent's home only (never the user's workspace): `~/SANDBOX_CONTEXT.md`, and
appended to the tool's own user-level instructions file (`Tool.context_file`, e.g.
`~/.claude/CLAUDE.md`) after the user's own copy of it, when the host has one that coi copies.
"""

from __future__ import annotations

from collections.abc import Sequence

from coi.sessions.sandbox import SandboxSpec

FILE = "SANDBOX_CONTEXT.md"
# Between the user's own instructions and coi's, so a reader (and coi) can tell them apart.
MARK = "<!-- coi sandbox context -->"

_NETWORK = {
    "restricted": "the internet is reachable; private networks (10.0.0.0/8, 172.16.0.0/12, "
    "192.168.0.0/16), the cloud metadata address and the host are blocked",
    "allowlist": "only the allowed hosts below are reachable; everything else is blocked",
    "open": "not restricted by coi",
}
_CREDENTIALS = {
    "broker": "There is no host credential in here. The API key or login in your environment "
    "is a placeholder: your tool's requests go through coi's credential broker on the host, "
    "which adds the real one. Other credentials (git hosting, cloud, SSH keys) are not here.",
    "copy": "The tool's login files were copied in for this session; otherwise there is no "
    "host credential in here (git hosting, cloud, SSH keys).",
    "none": "There is no host credential in here: none of the user's API keys, logins or SSH keys.",
}


def sandbox_context(
    spec: SandboxSpec,
    *,
    credentials: str,
    published: Sequence[tuple[int, int, int]] = (),
) -> str:
    """The text for this session. `credentials`: the mode in force (broker, copy, none);
    `published`: (host port, container port, how many consecutive) for each mapping."""
    policy = spec.policy
    mode = policy.mode if policy is not None else "open"
    lines = [
        "# You are in a coi sandbox",
        "",
        "You run inside an isolated container made by coi (code on incus), not on the user's "
        "machine.",
        "",
        f"- Workspace: `{spec.workspace_target}` is the user's project folder, shared live: "
        "what you write there is theirs.",
    ]
    if spec.masks is not None and spec.masks.paths:
        hidden = ", ".join(f"`{m.rel}`" for m in spec.masks.paths[:20])
        more = " and more" if len(spec.masks.paths) > 20 else ""
        lines.append(f"  Secret files read as empty here on purpose: {hidden}{more}.")
    if spec.protection is not None and spec.protection.enabled:
        lines.append(
            "  Git hooks, git config and editor/coi config in it are read-only "
            "(changes are reverted)."
        )
    lines.append(f"- Network: {mode}: {_NETWORK.get(mode, mode)}.")
    if policy is not None and mode == "allowlist" and policy.entries:
        lines.append("  Allowed: " + ", ".join(f"`{e}`" for e in policy.entries[:30]) + ".")
    if published:
        ports = ", ".join(
            f"{c} (host {h})" if n == 1 else f"{c}-{c + n - 1} (host {h}-{h + n - 1})"
            for h, c, n in published
        )
        lines.append(
            f"- Published ports: a server listening on 0.0.0.0 on {ports} is reachable by the "
            "user on their machine."
        )
    else:
        lines.append("- No ports are published: the user cannot reach a server you start.")
    lines.append(f"- {_CREDENTIALS.get(credentials, _CREDENTIALS['none'])}")
    lines.append(
        "- This container is "
        + (
            "kept after the session."
            if spec.persistent
            else "removed when the session ends: only the workspace stays."
        )
    )
    lines += [
        "",
        "If you need something the sandbox does not give (a host or site that is blocked, a "
        "credential, a folder outside the workspace, a published port), do not try to get "
        "around it: the host monitors this sandbox. Stop and ask the user; they can start a "
        "session with more (coi's config or flags, e.g. `--network allowlist` with the host "
        "in `[network] allowed_domains`, `--mount`, `[ports]`).",
    ]
    return "\n".join(lines) + "\n"


def with_context(own: bytes | None, text: str) -> bytes:
    """A tool's instructions file: the user's own (if any, without an earlier context of
    coi's), then coi's context."""
    base = (own or b"").decode(errors="replace").split(MARK, 1)[0].rstrip()
    head = f"{base}\n\n" if base else ""
    return f"{head}{MARK}\n{text}".encode()
