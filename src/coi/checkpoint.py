"""Named steps of a session's life where a fault-injection test can freeze coi (then kill it).

`COI_TEST_STOP_AT=<step>` makes coi stop itself (SIGSTOP) when it reaches that step; the
test sees the stopped process and kills it with SIGKILL, which is how a crash at exactly
that step is reproduced. Unset (always, outside the test suite), a step costs a dict lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "COI_TEST_STOP_AT"

# In the order `coi run` passes them.
RUN_STEPS = (
    "slot-claimed",  # a slot is claimed; no keeper yet, no container
    "keeper-started",  # the keeper watches; the container is not made yet
    "container-made",  # made and started, the network proven; the command not started
    "command-running",  # the command runs (reached once its exec has been sent)
    "cleaning-up",  # the command ended; the sandbox not removed yet
)
# `coi shell`'s, in order.
SHELL_STEPS = (
    "shell-made",  # the sandbox is made and runs; tmux (and the agent) not started yet
    "shell-cleaning",  # the session is over: its conversation not saved, the sandbox not removed
    "shell-saving",  # the conversation is pulled out beside the saved one, not yet swapped in
)
# `coi build`'s (and `coi build custom`'s), in order.
BUILD_STEPS = (
    "build-keeper-started",  # the keeper watches; the build container is not made yet
    "build-container-made",  # the build container runs; the script not started
    "build-stopped",  # the script ran, the container is stopped; not published yet
    "build-published",  # the image is published; the alias not pointed at it yet
)
# `coi snapshot restore`'s (of a running container) and `coi clean`'s.
SNAPSHOT_STEPS = ("snapshot-stopped",)  # the container stopped, not restored yet
CLEAN_STEPS = ("clean-removing",)  # the first container removed, the others not yet
# `coi file pull -r`'s: the tree is pulled beside the destination, not yet swapped in.
FILE_STEPS = ("file-pulled",)


def step(name: str) -> None:
    """Reached `name`: stop here if a test asked for it."""
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGSTOP)
