"""`coi clean --reviews`: every review copy, the pool's mirrors and its volume, except a
review a running sandbox still works on."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from coi.errors import CoiError
from coi.review import pool
from coi.review.copy import Review, all_reviews, discard, remove_tree

if TYPE_CHECKING:
    from coi.backend.client import IncusClient


@dataclass
class ReviewPlan:
    """The reviews `coi clean --reviews` removes, and those it keeps (in use)."""

    remove: list[Review] = field(default_factory=list)
    in_use: list[tuple[Review, str]] = field(default_factory=list)  # (review, container)


def plan(in_use: dict[str, str], home: Path | None = None) -> ReviewPlan:
    """`in_use`: review id -> the running container that works on it."""
    out = ReviewPlan()
    for r in all_reviews(home):
        if r.id in in_use:
            out.in_use.append((r, in_use[r.id]))
        else:
            out.remove.append(r)
    return out


def execute(
    client: IncusClient, pool_name: str, todo: ReviewPlan, log: Callable[[str], None]
) -> int:
    """Remove the plan's reviews, then what is left on the pool that no review kept needs
    (mirrors, snapshots a lost review left, the volume itself); returns items removed."""
    done = 0
    for r in todo.remove:
        log(f"Deleting review {r.id} ({r.state}, {r.workspace})...")
        try:
            discard(r)
            done += 1
        except (OSError, CoiError) as err:
            log(f"  Warning: could not delete review {r.id}: {err}")
    store = pool.open_store(client, pool_name, create=False)
    if store is None:
        return done
    kept = {r.store for r, _ in todo.in_use if r.store}
    if not kept:
        log(f"Deleting the storage volume {pool.VOLUME} (mirrors of workspaces)...")
        if pool.remove_volume(client, pool_name):
            done += 1
        return done
    # Snapshots whose review is gone (its folder in ~/.coi removed by hand, a start cut short).
    for folder in sorted(store.reviews.iterdir()) if store.reviews.is_dir() else ():
        if str(folder) not in kept:
            for sub in ("work", "base"):
                with contextlib.suppress(CoiError):
                    pool.delete_subvolume(folder / sub)
            remove_tree(folder)
            done += 1
    done += len(pool.drop_mirrors(store, {r.workspace for r, _ in todo.in_use}))
    return done
