"""The agent user's files coi reads and writes at a session's start (a tool's settings and
credentials): one command each way, run in the sandbox as that user.

Not through the daemon's file API: on LXD 5.0 the first file request on a running container
starts a helper process for it (`lxd forkfile`, 70-130 ms of the daemon's CPU), and a session
needed seven requests for two settings files. Run as the agent user, the files and the
folders made for them are the agent's, as its own programs would make them.
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from coi.backend.client import IncusClient
from coi.errors import SessionError
from coi.sessions.sandbox import Sandbox


class Unreadable:
    """A file that is there but the agent user cannot read (or is not a regular file)."""


UNREADABLE = Unreadable()

# What one environment variable may carry (Linux refuses a single one over 128 KiB, and all
# of them together are bounded too): a bigger file goes through the daemon's file API.
INLINE_LIMIT = 64 * 1024

# For each path: "-" when there is none, "?" when it cannot be read, else its size in bytes
# on a line of its own and then its bytes. `wc` and `cat` are in any image, busybox too.
_READ = (
    'for f do if [ ! -e "$f" ] && [ ! -L "$f" ]; then echo -; '
    'elif [ -f "$f" ] && [ -r "$f" ]; then n=$(wc -c < "$f") && echo "$n" && cat -- "$f" '
    "|| exit 1; else echo '?'; fi; done"
)

# Arguments: how many paths must not exist yet, those paths; how many files to write, a mode
# and a path for each (its content in COI_FILE_<i>); then, optionally, a command to run next.
# A path that exists ends it with PRESENT before anything is written. Each file is written
# beside its place and renamed over it, so a reader never sees half a file and a symbolic
# link standing there is replaced, not followed. The contents are taken out of the
# environment before the command starts: tmux would keep them for every pane.
PRESENT = 42
WRITE_FAILED = 43
_SCRIPT = r"""
n=$1; shift
while [ "$n" -gt 0 ]; do
  if [ -e "$1" ] || [ -L "$1" ]; then echo "$1 is there" >&2; exit 42; fi
  shift; n=$((n-1))
done
n=$1; shift
( set -e; umask 077; i=0
  while [ $i -lt "$n" ]; do
    mode=$1 f=$2; shift 2; d=${f%/*}; t="$d/.coi-write-$$-$i"; mkdir -p -- "$d"
    eval "printf %s \"\$COI_FILE_$i\"" > "$t"; chmod "$mode" "$t"; mv -f -- "$t" "$f"
    i=$((i+1))
  done ) || exit 43
i=0; while [ $i -lt "$n" ]; do unset "COI_FILE_$i"; shift 2; i=$((i+1)); done
[ $# -eq 0 ] || exec "$@"
"""


@dataclass(frozen=True)
class HomeFile:
    """A file for the agent's home: `rel` is relative to it."""

    rel: str
    data: bytes
    mode: int = 0o600


def read(
    client: IncusClient, box: Sandbox, rels: Sequence[str]
) -> dict[str, bytes | Unreadable | None]:
    """The content of these files of the agent's home; None for one that is not there."""
    if not rels:
        return {}
    paths = [_path(box, rel) for rel in rels]
    res = client.exec.recorded(
        box.name,
        box.request(["sh", "-c", _READ, "sh", *paths], {}, cwd=box.spec.home),
        read_output=lambda _code: True,
        tidy=box.lasting,
    )
    if res.exit_code != 0:
        raise SessionError(
            f"could not read {', '.join(paths)} in the container: "
            + res.stderr.decode(errors="replace").strip(),
            resolution="Check that the container runs and its image has a shell.",
        )
    return dict(zip(rels, _parse(res.stdout, paths), strict=True))


def _parse(out: bytes, paths: Sequence[str]) -> list[bytes | Unreadable | None]:
    found: list[bytes | Unreadable | None] = []
    pos = 0
    for _ in paths:
        end = out.find(b"\n", pos)
        if end < 0:
            break
        line = out[pos:end].strip()
        pos = end + 1
        if line == b"-":
            found.append(None)
        elif line == b"?":
            found.append(UNREADABLE)
        elif line.isdigit() and pos + int(line) <= len(out):
            found.append(out[pos : pos + int(line)])
            pos += int(line)
        else:
            break
    if len(found) != len(paths) or pos != len(out):
        # Only a file changing between `wc` and `cat` does this: something in the
        # sandbox is writing it right now.
        raise SessionError(
            f"{', '.join(paths)} changed in the container while coi read them",
            resolution="Start the session again.",
        )
    return found


def inlinable(files: Sequence[HomeFile]) -> bool:
    """Whether one command can carry all these files (see `command`)."""
    return all(_inlinable(f.data) for f in files)


def command(
    box: Sandbox,
    files: Sequence[HomeFile],
    *,
    absent: Sequence[str] = (),
    then: Sequence[str] = (),
) -> tuple[list[str], dict[str, str]]:
    """The command (and its environment) that writes these files as the agent user, then
    runs `then` in its place; first, it exits with PRESENT if a file of `absent` (relative to
    the home) is there. All files must be `inlinable`."""
    args = [str(len(absent)), *(_path(box, rel) for rel in absent), str(len(files))]
    env: dict[str, str] = {}
    for i, f in enumerate(files):
        args += [format(f.mode, "o"), _path(box, f.rel)]
        env[f"COI_FILE_{i}"] = f.data.decode()
    return ["sh", "-c", _SCRIPT, "sh", *args, *then], env


def failed(box: Sandbox, files: Sequence[HomeFile], stderr: bytes) -> SessionError:
    """The error for a `command` that ended with WRITE_FAILED."""
    return SessionError(
        "could not write "
        + ", ".join(_path(box, f.rel) for f in files)
        + " in the container: "
        + stderr.decode(errors="replace").strip(),
        resolution="Check that the agent user owns its home in the container's image.",
    )


def write(client: IncusClient, box: Sandbox, files: Sequence[HomeFile]) -> None:
    """Write these files into the agent's home as the agent user, folders made as needed."""
    inline: list[HomeFile] = []
    big: list[HomeFile] = []
    for f in files:
        (inline if _inlinable(f.data) else big).append(f)
    if inline:
        argv, env = command(box, inline)
        res = client.exec.recorded(
            box.name, box.request(argv, env, cwd=box.spec.home), tidy=box.lasting
        )
        if res.exit_code != 0:
            raise failed(box, inline, res.stderr)
    for f in big:
        _push(client, box, f)


def _inlinable(data: bytes) -> bool:
    if len(data) > INLINE_LIMIT or b"\0" in data:
        return False
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def _push(client: IncusClient, box: Sandbox, f: HomeFile) -> None:
    """A file the environment cannot carry (big, or not text): the daemon's file API."""
    uid = box.spec.code_uid
    dest = _path(box, f.rel)
    parent = posixpath.dirname(dest)
    if parent != box.spec.home and client.files.stat(box.name, parent) is None:
        client.files.mkdir(box.name, parent, uid=uid, gid=uid, mode=0o700, parents=True)
    client.files.push_bytes(box.name, dest, f.data, uid=uid, gid=uid, mode=f.mode)


def _path(box: Sandbox, rel: str) -> str:
    return posixpath.join(box.spec.home, rel)


def under(files: Mapping[str, HomeFile], folder: str) -> dict[str, bytes]:
    """The files of `folder` (relative to the home) among these, by path relative to it."""
    prefix = folder.rstrip("/") + "/"
    return {rel[len(prefix) :]: f.data for rel, f in files.items() if rel.startswith(prefix)}
