"""Where a sandbox is made on an Incus cluster: the scheduler's choice, or the member asked for.

coi leaves placement to the cluster (its scheduler puts a new instance on the member with the
fewest); `--target MEMBER` names one, checked here before anything is made.
"""

from __future__ import annotations

from coi.backend.client import IncusClient
from coi.errors import UsageError


def check_target(client: IncusClient, target: str) -> None:
    """`target` is a member of the daemon's cluster ('' : nothing asked, nothing to check).

    :raises UsageError: the daemon is not in a cluster, or has no member of that name.
    """
    if not target:
        return
    where = client.endpoint.url or "the local daemon"
    if not client.server.clustered:
        raise UsageError(
            f"--target {target}: the daemon is not a cluster, there is no member to choose",
            details=f"{where} does not say it is in a cluster (API extension 'clustering', "
            "environment.server_clustered).",
            resolution="Drop --target; it chooses a member of an Incus cluster (a remote that "
            "is one: 'coi --remote NAME ...').",
        )
    members = client.cluster_members()
    if target not in members:
        raise UsageError(
            f"--target {target}: the cluster has no member of that name",
            details=f"Its members: {', '.join(members) or '(none listed)'}.",
            resolution="Use one of them, or leave --target out: the cluster's scheduler then "
            "chooses.",
        )
