"""`coi review fetch`: a running remote review sandbox's work brought into its review."""

from __future__ import annotations

import os

import click

from coi.cli.app import CoiCommand

FETCH_EXAMPLES = """\
  coi --remote build shell --background --review
  coi review fetch                     # the folder's latest pending review, from its daemon
  coi diff                             # what the agent changed so far"""


@click.command("fetch", cls=CoiCommand, examples=FETCH_EXAMPLES)
@click.argument("review", required=False)
@click.option(
    "-w",
    "--workspace",
    default=None,
    metavar="DIR",
    help="Whose latest pending review, when REVIEW is not given (default: .).",
)
def fetch_cmd(review: str | None, workspace: str | None) -> None:
    """Bring the agent's work from a running sandbox on a remote daemon into its review.

    A remote sandbox works on an uploaded copy; its work comes back by itself when coi
    removes the sandbox. This fetches it now (the sandbox goes on), so that 'coi diff' and
    'coi apply' see it. What comes back is unpacked as data: only files, folders and links
    (kept as links), nothing outside the review, no setuid bits (docs/remote.md).
    """
    from coi.cli.context import daemon
    from coi.errors import UsageError
    from coi.review.copy import find
    from coi.review.settings import max_file
    from coi.sessions.remote import CAP_FACTOR, fetch_running

    r = find(review, workspace)
    if not r.container:
        raise UsageError(
            f"review {r.id} has no sandbox working on it",
            resolution="Its copy is on this machine: 'coi diff' shows it as it is.",
        )
    # The daemon and project the review's sandbox runs on, unless said otherwise.
    if r.remote and not os.environ.get("COI_REMOTE"):
        os.environ["COI_REMOTE"] = r.remote
    if r.project and not os.environ.get("COI_PROJECT"):
        os.environ["COI_PROJECT"] = r.project
    cfg, client = daemon()
    cap = max_file(cfg)
    with client:
        fetch_running(
            client,
            r.container,
            cap=cap * CAP_FACTOR if cap else None,
            log=lambda m: click.echo(m, err=True),
            expect=r.id,
        )
    click.echo(f"Review {r.id}: 'coi diff {r.id}' shows the changes so far")
