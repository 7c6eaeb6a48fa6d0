"""Progress a person can follow and a full log file, for image builds."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from coi.errors import CoiError


class BuildFailed(CoiError):
    """A build step failed; the message names the step and the log file."""


class BuildLog:
    """Steps with elapsed times on the terminal; every line of every command in the log file."""

    def __init__(self, path: Path, *, out: TextIO | None = None, verbose: bool = False) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._fh = path.open("a", encoding="utf-8", errors="replace")
        self._out = out or sys.stderr
        self.verbose = verbose
        self.started = time.monotonic()
        self.current = ""
        self._tail: deque[str] = deque(maxlen=25)

    def close(self) -> None:
        self._fh.close()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def _stamp(self) -> str:
        m, s = divmod(int(self.elapsed()), 60)
        return f"{m:02d}:{s:02d}"

    def say(self, msg: str) -> None:
        """A line for the user (and the log)."""
        self._out.write(f"[{self._stamp()}] {msg}\n")
        self._out.flush()
        self.write(f"### {msg}\n")

    def note(self, msg: str) -> None:
        """A line for the log (and the terminal with --verbose)."""
        self.write(msg + "\n")
        if self.verbose:
            self._out.write(f"        {msg}\n")
            self._out.flush()

    def write(self, text: str) -> None:
        self._fh.write(text)
        self._fh.flush()

    def output(self, data: bytes) -> None:
        """Raw output of a build command: the log always, the terminal with --verbose."""
        text = data.decode(errors="replace")
        self._tail.extend(line for line in text.splitlines() if line.strip())
        self.write(text)
        if self.verbose:
            self._out.write(text)
            self._out.flush()

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        self.current = name
        t0 = time.monotonic()
        self.say(f"{name}...")
        try:
            yield
        except BuildFailed:
            raise
        except CoiError as err:
            raise self.failed(str(err)) from err
        self.say(f"{name}: done ({time.monotonic() - t0:.1f}s)")

    def failed(self, why: str) -> BuildFailed:
        self.write(f"### FAILED in step '{self.current}': {why}\n")
        tail = "\n".join(self._tail)
        return BuildFailed(
            f"build failed in step '{self.current}': {why}",
            details=(f"last output:\n{tail}\n" if tail else "") + f"full log: {self.path}",
            resolution=f"Read the log ({self.path}), fix the cause, and run the build again.",
        )

    def run(self, cmd: list[str]) -> None:
        """Run a host command, its output into the log. :raises BuildFailed: non-zero exit."""
        self.note("$ " + " ".join(cmd))
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                self.output(line)
        if proc.returncode != 0:
            raise self.failed(f"{cmd[0]} exited with {proc.returncode}")
