"""coi killed with SIGKILL: its sandbox does not run on unwatched (the keeper ends it)."""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest
from tests.conftest import coi_argv, run_coi
from tests.integration.conftest import (
    USER,
    coi_names,
    converse,
    keepers,
    leave,
    proc_state,
    spawn_shell,
    user_dir,
    wait_for,
    wait_gone,
)

from coi import checkpoint
from coi.backend import IncusClient
from coi.backend.exec import ExecRequest

# coi's keeper looks at its owner once a second; the daemon's forced stop takes a moment.
WITHIN = 10


def _start_run(uenv: dict[str, str], ws: Path, *command: str) -> subprocess.Popen[str]:
    argv = coi_argv("run", "--image", "coi-tiny", "-w", str(ws), "--", *command, user=USER)
    return subprocess.Popen(
        argv, env=uenv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True
    )


def _kill_hard(proc: subprocess.Popen[str]) -> None:
    # setpriv execs coi in the same process: its pid is coi's.
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


@pytest.mark.parametrize("when", ["running", "launching"])
def test_a_killed_coi_run_leaves_nothing_running(
    client: IncusClient, base: Path, uenv: dict[str, str], user: pwd.struct_passwd, when: str
) -> None:
    """SIGKILL while the command runs, or while the sandbox is still being made: within
    10 s nothing of that run remains, and the next run in the folder works."""
    ws = user_dir(base / "ws", user)
    proc = _start_run(uenv, ws, "sleep", "120")
    if when == "running":
        wait_for(
            lambda: any(client.instances.get(n).running for n in coi_names(client, ws)),
            "the sandbox to run",
        )
        time.sleep(1)  # the command is under way
    else:
        # As soon as coi has a name for it: the create is what is under way.
        wait_for(lambda: bool(keepers(ws)), "coi to start its keeper")
    _kill_hard(proc)
    killed_at = time.monotonic()
    wait_for(lambda: not coi_names(client, ws), "the sandbox of the killed coi to go", WITHIN + 20)
    took = time.monotonic() - killed_at
    assert took < WITHIN, f"gone after {took:.1f} s"
    wait_for(lambda: not keepers(ws), "the keeper to end", 10)
    again = run_coi(
        "run", "--image", "coi-tiny", "-w", str(ws), "--", "echo", "again", env=uenv, user=USER
    )
    assert again.returncode == 0 and again.stdout.strip() == "again", again.stderr


def test_a_run_that_ends_dismisses_its_keeper(
    client: IncusClient, base: Path, uenv: dict[str, str], user: pwd.struct_passwd
) -> None:
    ws = user_dir(base / "ws", user)
    res = run_coi("run", "--image", "coi-tiny", "-w", str(ws), "--", "true", env=uenv, user=USER)
    assert res.returncode == 0, res.stderr
    assert keepers(ws) == []


def _stopped(pid: int) -> bool:
    """The process stopped itself (SIGSTOP at its test step)."""
    return proc_state(pid) == "T"


@pytest.mark.parametrize("step", checkpoint.RUN_STEPS)
def test_kill_9_at_each_step_of_coi_run_leaves_nothing(
    client: IncusClient, base: Path, uenv: dict[str, str], user: pwd.struct_passwd, step: str
) -> None:
    """coi frozen at a named step (COI_TEST_STOP_AT), then SIGKILLed: within 10 s no
    container, no slot claim, no keeper of that run is left, and the next run works."""
    ws = user_dir(base / "ws", user)
    home = Path(uenv["COI_HOME"])
    command = ["true"] if step == "cleaning-up" else ["sleep", "120"]  # it ends, or it runs
    argv = coi_argv("run", "--image", "coi-tiny", "-w", str(ws), "--", *command, user=USER)
    proc = subprocess.Popen(
        argv,
        env={**uenv, checkpoint.ENV: step},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: _stopped(proc.pid), f"coi to stop at {step}", 60)
    finally:
        _kill_hard(proc)  # type: ignore[arg-type]
    killed_at = time.monotonic()

    def claims() -> list[Path]:
        return sorted((home / "locks").glob("*.claim"))

    if step == "slot-claimed":
        # Killed before its keeper started: only the slot's claim is left, naming a dead
        # process; the next run in the folder drops it (asserted below).
        assert coi_names(client, ws) == []
    else:
        wait_for(
            lambda: not coi_names(client, ws) and not claims(),
            f"the sandbox and slot claim of coi killed at {step} to go",
            WITHIN + 20,
        )
        took = time.monotonic() - killed_at
        assert took < WITHIN, f"gone after {took:.1f} s"
    wait_for(lambda: not keepers(ws), "the keeper to end", 70)
    again = run_coi(
        "run", "--image", "coi-tiny", "-w", str(ws), "--", "echo", "again", env=uenv, user=USER
    )
    assert again.returncode == 0 and again.stdout.strip() == "again", again.stderr
    assert "slot 1" in again.stderr  # the dead run's slot is free again
    assert claims() == [] and coi_names(client, ws) == []


BARRIER = (
    "touch /workspace/$(hostname); i=0; "
    "while [ $(ls /workspace | wc -l) -lt 20 ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done"
)
# Rounds of the twenty-at-once test; scripts/stress.sh runs it five times over.
ROUNDS = int(os.environ.get("COI_STRESS_ROUNDS", "1"))


@pytest.mark.slow
@pytest.mark.parametrize("round_", range(ROUNDS))
def test_twenty_runs_at_once_on_one_workspace(
    client: IncusClient, base: Path, uenv: dict[str, str], user: pwd.struct_passwd, round_: int
) -> None:
    """Twenty `coi run` started together in one folder (slots allowed: 20, where upstream
    stops at 10): twenty slots, each run's own exit code, and nothing left after."""
    ws = user_dir(base / "ws", user)
    env = {**uenv, "COI_MAX_SLOTS": "20"}
    procs = []
    for i in range(20):
        argv = coi_argv(
            "run", "--image", "coi-tiny", "-w", str(ws), "--",
            # Each waits (bounded) until all twenty run: they are at once, not in turn.
            "sh", "-c", f"{BARRIER}; hostname; exit {i % 7}", user=USER,
        )  # fmt: skip
        procs.append(
            subprocess.Popen(
                argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    hosts, failures = [], []
    for i, proc in enumerate(procs):
        out, err = proc.communicate(timeout=300)
        if proc.returncode != i % 7:
            failures.append(f"run {i}: exit {proc.returncode}, wanted {i % 7}: {err[-400:]}")
        hosts.append(out.strip())
    assert failures == []
    assert len(set(hosts)) == 20, hosts  # twenty distinct containers
    slots = sorted(int(h.rsplit("-", 1)[1]) for h in hosts)
    assert slots == list(range(1, 21))
    wait_for(lambda: not coi_names(client, ws), "the twenty sandboxes to go", 60)
    assert sorted((Path(uenv["COI_HOME"]) / "locks").glob("*.claim")) == []
    wait_for(lambda: not keepers(ws), "the keepers to end", 30)


@pytest.fixture
def small_home(
    base: Path, uenv: dict[str, str], user: pwd.struct_passwd
) -> Iterator[dict[str, str]]:
    """coi's state folder on a 4 MiB tmpfs of the test user's: a disk that fills."""
    home = user_dir(base / "small-home", user)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size=4m,mode=0755,uid={user.pw_uid},gid={user.pw_gid}",
         "coi-test-small", str(home)],
        check=True,
    )  # fmt: skip
    try:
        yield {**uenv, "COI_HOME": str(home / ".coi")}
    finally:
        subprocess.run(["umount", "-l", str(home)], check=False)


def test_a_full_disk_during_the_save_keeps_the_previous_session(
    client: IncusClient, base: Path, small_home: dict[str, str], user: pwd.struct_passwd
) -> None:
    """The session's state no longer fits on the disk of coi's state folder: the save fails
    with a warning, and the session saved before is intact and resumes."""
    ws = user_dir(base / "ws", user)
    child = spawn_shell(small_home, ws)
    converse(child, "turn one")
    leave(child)
    (saved,) = (Path(small_home["COI_HOME"]) / "sessions-standin").iterdir()
    log = saved / ".standin" / "conversation.log"
    assert log.read_text() == "turn one\n"
    wait_gone(client, ws)

    child = spawn_shell(small_home, ws, "--resume")
    child.expect("earlier: turn one")
    converse(child, "turn two")
    (name,) = coi_names(client, ws)
    # 8 MiB of state: twice what the disk holds.
    big = client.exec.run(
        name,
        ExecRequest(
            ["sh", "-c", "head -c 8388608 /dev/urandom > /home/code/.standin/big"],
            user=1000, group=1000,
        ),
    )  # fmt: skip
    assert big.exit_code == 0, big.stderr
    child.expect("standin> ")
    child.sendline("/exit")
    child.expect("bye")
    child.sendline("exit")
    child.expect("could not save session data")
    child.expect(pexpect.EOF, timeout=60)
    child.close()
    assert log.read_text() == "turn one\n"  # the earlier save, whole
    assert not list(saved.parent.glob("**/.pull-*"))  # no half-written copy left
    wait_gone(client, ws)

    child = spawn_shell(small_home, ws, "--resume")
    child.expect("earlier: turn one")
    leave(child)
    wait_gone(client, ws)


def test_coi_clean_never_takes_a_sandbox_from_a_live_coi(
    client: IncusClient, base: Path, uenv: dict[str, str], user: pwd.struct_passwd
) -> None:
    """Two `coi clean --force` going round while six `coi run` start (a sandbox is Stopped
    between its create and its start, and its bridge unused until it attaches): every run
    works, and what clean removes is only what nobody owns."""
    ws = user_dir(base / "ws", user)
    runs = [
        subprocess.Popen(
            coi_argv(
                "run", "--image", "coi-tiny", "-w", str(ws), "--", "sh", "-c", "exit 3", user=USER
            ),
            env=uenv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(6)
    ]
    cleans: list[subprocess.CompletedProcess[str]] = []

    def clean_while_running() -> None:
        deadline = time.monotonic() + 120
        while any(r.poll() is None for r in runs) and time.monotonic() < deadline:
            cleans.append(run_coi("clean", "--force", env=uenv, user=USER, timeout=120))

    threads = [threading.Thread(target=clean_while_running) for _ in range(2)]
    for t in threads:
        t.start()
    failures = []
    for r in runs:
        _, err = r.communicate(timeout=240)
        if r.returncode != 3:
            failures.append(f"exit {r.returncode}: {err[-600:]}")
    for t in threads:
        t.join(timeout=240)
    assert failures == []
    assert cleans and all(c.returncode == 0 for c in cleans), [c.stderr for c in cleans]
    wait_for(lambda: not coi_names(client, ws), "the runs' sandboxes to go", 60)


@pytest.mark.parametrize("step", checkpoint.SHELL_STEPS)
def test_kill_9_at_each_step_of_coi_shell(
    client: IncusClient, base: Path, uenv: dict[str, str], user: pwd.struct_passwd, step: str
) -> None:
    """coi shell frozen at a named step, then SIGKILLed: while the sandbox is made (before
    tmux runs), and while the ended session is saved and removed, nothing is meant to outlive
    coi. Within 10 s its keeper has saved the conversation (when the session had ended),
    removed the sandbox and freed the slot; the earlier save is never lost, and --resume
    continues from the newest one."""
    ws = user_dir(base / "ws", user)
    home = Path(uenv["COI_HOME"])
    child = spawn_shell(uenv, ws)
    converse(child, "turn one")
    leave(child)
    (saved,) = (home / "sessions-standin").iterdir()
    log = saved / ".standin" / "conversation.log"
    wait_gone(client, ws)

    child = spawn_shell({**uenv, checkpoint.ENV: step}, ws, "--resume")
    if step != "shell-made":
        converse(child, "turn two")
        child.expect("standin> ")
        child.sendline("/exit")
        child.expect("bye")
        child.sendline("exit")
        child.expect("Cleaning up session")
    wait_for(lambda: _stopped(child.pid), f"coi to stop at {step}", 60)
    assert coi_names(client, ws)  # its sandbox, left to the keeper
    os.kill(child.pid, signal.SIGKILL)
    child.close(force=True)
    killed_at = time.monotonic()
    wait_for(
        lambda: not coi_names(client, ws) and not list((home / "locks").glob("*.claim")),
        f"the sandbox and slot claim of coi shell killed at {step} to go",
        WITHIN + 20,
    )
    took = time.monotonic() - killed_at
    assert took < WITHIN, f"gone after {took:.1f} s"
    wait_for(lambda: not keepers(ws), "the keeper to end", 30)
    turns = "turn one\n" if step == "shell-made" else "turn one\nturn two\n"
    assert log.read_text() == turns  # never less than the earlier save
    assert not (saved / ".standin.old").exists()
    cleaned = run_coi("clean", "--force", env=uenv, user=USER)
    assert cleaned.returncode == 0, cleaned.stderr
    assert not list(saved.glob(".pull-*"))  # a copy the killed coi was making, if any

    child = spawn_shell(uenv, ws, "--resume")
    child.expect("earlier: turn one")
    if step != "shell-made":
        child.expect("earlier: turn two")
    leave(child)
    wait_gone(client, ws)


def test_a_save_killed_between_its_renames_is_recovered(tmp_path: Path) -> None:
    """The swap of a saved conversation is two renames; killed between them, the previous
    save sits at `<dir>.old` and the next reader puts it back."""
    from coi.sessions.store import SessionStore

    store = SessionStore(tmp_path, "standin")
    state = store.dir("s1") / ".standin"
    state.mkdir(parents=True)
    (state / "conversation.log").write_text("turn one\n")
    state.rename(state.with_name(".standin.old"))  # the first rename done, then killed
    assert (store.state_path("s1", ".standin") / "conversation.log").read_text() == "turn one\n"
    assert not state.with_name(".standin.old").exists()


def test_kill_9_of_a_folder_pull_before_its_swap_keeps_the_old_folder(
    client: IncusClient, coi_env: dict[str, str], tmp_path: Path, unique: str
) -> None:
    """`coi file pull -r` killed with all of it pulled beside the destination, not yet swapped
    in (the file-pulled step): the old folder is whole; the next pull swaps in the new one and
    removes the dead pull's leftover."""
    res = run_coi("container", "launch", "coi-tiny", unique, env=coi_env)
    assert res.returncode == 0, res.stderr
    try:
        made = client.exec.capture(
            unique, ExecRequest(["sh", "-c", "mkdir -p /data && echo new > /data/a"])
        )
        assert made.exit_code == 0, made.stderr
        out = tmp_path / "out"
        out.mkdir()
        (out / "a").write_text("old\n")
        argv = coi_argv("file", "pull", "-r", f"{unique}:/data", str(out))
        proc = subprocess.Popen(argv, env={**coi_env, checkpoint.ENV: "file-pulled"})
        try:
            wait_for(lambda: _stopped(proc.pid), "coi to stop before the swap", 60)
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        assert (out / "a").read_text() == "old\n"
        assert [p.name for p in tmp_path.glob(".out.pull-*")]  # the dead pull's copy
        again = run_coi("file", "pull", "-r", f"{unique}:/data", str(out), env=coi_env)
        assert again.returncode == 0, again.stderr
        assert (out / "a").read_text() == "new\n"
        assert list(tmp_path.glob(".out.pull-*")) == []
    finally:
        client.instances.delete(unique, force=True)
