"""A review's folder in coi's state: `base/` (the workspace at the start), `work/` (the
agent's copy) and `review.json`; made with `cp -a --reflink=auto`."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import stat
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from coi.config.paths import reviews_dir
from coi.errors import UsageError
from coi.fsio import write_atomic
from coi.review import pool
from coi.review.cp import Progress, copy_tree
from coi.review.pool import PoolStore
from coi.review.tree import walk

STATES = ("pending", "applied", "discarded")
META = "review.json"
# work/'s files as copied (inode, ctime...): `coi diff` reads only those changed since.
INDEX = "index.json"


@dataclass
class Review:
    """One review: where its copies are and what became of it."""

    id: str
    workspace: str
    created: float
    state: str = "pending"
    session: str = ""
    container: str = ""
    applied: list[str] = field(default_factory=list)  # what a --partial apply already wrote
    # Where base/ and work/ are when not in `folder`: btrfs snapshots on the daemon's pool
    # (coi.review.pool), whose files keep base's inode numbers and ctimes until changed.
    store: str = ""
    # The daemon the sandbox runs on when it is not the local one (what `coi review fetch`
    # connects to), and its project.
    remote: str = ""
    project: str = ""
    folder: str = ""  # not stored: where review.json was read from

    @property
    def snapshots(self) -> bool:
        return bool(self.store)

    @property
    def base(self) -> str:
        return os.path.join(self.store or self.folder, "base")

    @property
    def work(self) -> str:
        return os.path.join(self.store or self.folder, "work")

    def index(self) -> dict[str, list[int]] | None:
        """work/'s files as they were copied ({} when missing: then every file is read);
        None for snapshots: a file with base's own inode and ctime is base's."""
        if self.snapshots:
            return None
        try:
            data = json.loads((Path(self.folder) / INDEX).read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def save(self) -> None:
        data = {k: v for k, v in asdict(self).items() if k != "folder"}
        write_atomic(Path(self.folder) / META, json.dumps(data, indent=2) + "\n")


def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:24] or "ws"


def _copy(src: str, dst: str, progress: Progress | None = None) -> None:
    """`cp -a --reflink=auto src/. dst` into a new private folder: shares extents where the
    filesystem can (btrfs, XFS), a plain copy elsewhere; symlinks copied as links."""
    os.mkdir(dst, 0o700)
    copy_tree(src, dst, what=src, progress=progress)


def start(
    workspace: str | Path,
    *,
    session: str = "",
    container: str = "",
    home: Path | None = None,
    store: PoolStore | None = None,
    progress: Progress | None = None,
) -> Review:
    """Make a review of `workspace`: base/ and work/ as it is now, state pending; with
    `store`, as snapshots on the daemon's pool, else copies in the reviews folder.

    :raises UsageError: the workspace is not a folder.
    :raises CoiError: the copy failed (nothing is left behind).
    """
    ws = os.path.realpath(workspace)
    if not os.path.isdir(ws):
        raise UsageError(f"not a folder: {workspace}")
    root = home if home is not None else reviews_dir()
    real_root = os.path.realpath(root)
    if os.path.commonpath([ws, real_root]) in (ws, real_root):
        raise UsageError(
            f"cannot review {ws}: it holds coi's reviews folder {real_root} (or is inside it)",
            resolution="Review a project folder, not your home directory or ~/.coi.",
        )
    _private_dir(root)
    rid = f"{_slug(os.path.basename(ws))}-{secrets.token_hex(3)}"
    folder = root / rid
    folder.mkdir(mode=0o700)
    review = Review(rid, ws, time.time(), session=session, container=container, folder=str(folder))
    if store is not None:
        review.store = str(store.reviews / rid)
    try:
        if store is not None:
            _private_dir(Path(review.store))
            pool.snapshot(store, ws, review.base, review.work, progress=progress)
            review.save()
            return review
        _copy(ws, review.base, progress)
        # work/ is copied from base/, not from the workspace: both are the same state even if
        # the user edits files while the copy runs.
        _copy(review.base, review.work)
        os.chmod(review.work, stat.S_IMODE(os.stat(ws).st_mode))
        os.chmod(review.base, 0o700)
        stamps = {rel: e.stamp() for rel, e in walk(review.work).items() if e.kind == "file"}
        write_atomic(folder / INDEX, json.dumps(stamps, separators=(",", ":")))
        review.save()
    except BaseException:
        _remove_review(review)
        raise
    return review


def _remove_review(review: Review) -> None:
    if review.store:
        for sub in (review.work, review.base):
            pool.delete_subvolume(sub)
        remove_tree(Path(review.store))
    remove_tree(Path(review.folder))


def load(folder: Path) -> Review | None:
    """A review from its folder; None when review.json is missing or malformed."""
    try:
        data = json.loads((folder / META).read_text())
        review = Review(**{k: v for k, v in data.items() if k in Review.__dataclass_fields__})
    except (OSError, ValueError, TypeError):
        return None
    if review.id != folder.name or review.state not in STATES:
        return None
    review.folder = str(folder)
    return review


def all_reviews(home: Path | None = None) -> list[Review]:
    """Every review, oldest first (those being discarded included)."""
    root = home if home is not None else reviews_dir()
    try:
        folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink())
    except FileNotFoundError:
        return []
    found = [r for r in (load(p) for p in folders) if r is not None]
    return sorted(found, key=lambda r: (r.created, r.id))


def bind(
    review_id: str,
    container: str,
    *,
    remote: str = "",
    project: str = "",
    home: Path | None = None,
) -> None:
    """Record the sandbox that works on a review (what `--slot` finds it by) and where it
    runs (what `coi review fetch` connects to)."""
    root = home if home is not None else reviews_dir()
    review = load(root / review_id)
    if review is None:
        return
    where = (container, remote, project)
    if (review.container, review.remote, review.project) != where:
        review.container, review.remote, review.project = where
        review.save()


def find(
    ref: str | None,
    workspace: str | Path | None,
    home: Path | None = None,
    *,
    include_discarded: bool = False,
    slot: int | None = None,
) -> Review:
    """A review by id (or unique prefix), else the workspace's latest pending one (of the
    sandbox in `slot`, when given). `include_discarded`: also one whose discard was cut
    short, by its exact id.

    :raises UsageError: none matches, or a prefix matches several.
    """
    everything = all_reviews(home)
    reviews = [r for r in everything if r.state != "discarded"]
    if ref and include_discarded:
        reviews += [r for r in everything if r.state == "discarded" and r.id == ref]
    if ref:
        exact = [r for r in reviews if r.id == ref]
        hits = exact or [r for r in reviews if r.id.startswith(ref)]
        if len(hits) == 1:
            return hits[0]
        if not hits:
            raise UsageError(
                f"no review named '{ref}'", resolution="See the pending ones: coi review list"
            )
        raise UsageError(
            f"'{ref}' matches several reviews: {', '.join(r.id for r in hits)}",
            resolution="Give more of the id.",
        )
    ws = os.path.realpath(workspace if workspace is not None else ".")
    mine = [r for r in reviews if r.workspace == ws and r.state == "pending"]
    if slot is not None:
        mine = [r for r in mine if r.container.endswith(f"-{slot}")]
        if not mine:
            raise UsageError(
                f"no pending review of {ws} from a sandbox in slot {slot}",
                resolution="See which there are: coi review list",
            )
    if not mine:
        raise UsageError(
            f"no pending review of {ws}",
            resolution="Start one with: coi review start (or name one: coi review list --all)",
        )
    return mine[-1]


def remove_tree(path: Path) -> None:
    """Delete a folder the agent may have left unwritable (chmod 0 folders); links are
    removed, never followed."""

    def fix(func: object, p: str, exc: object) -> None:
        parent = os.path.dirname(p)
        with contextlib.suppress(OSError):
            os.chmod(parent, 0o700)
        with contextlib.suppress(OSError):
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, 0o700)
                shutil.rmtree(p, onerror=fix)
            else:
                os.unlink(p)

    if path.exists() or path.is_symlink():
        shutil.rmtree(path, onerror=fix)


def discard(review: Review) -> None:
    """Remove the review's folder. Marked discarded first, so a discard cut short is still
    out of the pending list, and running it again finishes it."""
    if review.state != "discarded":
        review.state = "discarded"
        review.save()
    _remove_review(review)


def mark_applied(review: Review) -> None:
    review.state = "applied"
    review.save()
