"""Cells that run once: a lock per cell and per study run, and cell processes that die with their runner.

A cell process holds ``fcntl.flock`` on ``<cell>/LOCK`` from before it cleans anything until it
exits, so two runners (or a runner and a Slurm task) never run or clean the same cell at once.
The kernel drops a lock when its process dies, so a killed run leaves no stale lock. The file
names its holder (pid, host, start time) for messages. A symbolic link in place of a lock file (planted
in a shared results folder) is refused, never followed. The study lock ``<study>/LOCK`` serialises
the study-level steps of concurrent runs: cell folders and calibration, then the tables.

A cell started by an executor (which sets ``MOEBENCH_PARENT_PID``) ends when that executor ends:
Linux ``PR_SET_PDEATHSIG`` (SIGTERM), plus a watchdog thread that notices a new parent elsewhere.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
import signal
import socket
import threading
import time

from moebench.util import arm_parent_death_signal, open_nofollow

LOCK_FILE = "LOCK"
BUSY_EXIT = 75  # EX_TEMPFAIL: another process holds the cell; not a failure, nothing was touched
PARENT_ENV = "MOEBENCH_PARENT_PID"


def _lock_path(folder: str) -> str:
    return os.path.join(folder, LOCK_FILE)


def try_lock(folder: str, wait_s: float = 0.0) -> int | None:
    """A file descriptor holding the exclusive lock of ``folder`` (kept until closed or exit), or None.

    Tries for ``wait_s`` seconds, so a brief `is_locked` probe by another process is not taken
    for a running cell. The lock file then names this process.
    """
    fd = open_nofollow(_lock_path(folder), os.O_RDWR | os.O_CREAT)  # a planted link is refused, never truncated
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                return None
            time.sleep(0.05)
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {stamp}\n".encode(), 0)
    return fd


def release(fd: int | None) -> None:
    """Give up a lock taken with `try_lock`."""
    if fd is not None:
        os.close(fd)


def is_locked(folder: str) -> bool:
    """Whether a process holds the lock of ``folder`` now (creates nothing)."""
    try:
        fd = open_nofollow(_lock_path(folder), os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def holder(folder: str) -> str:
    """Who holds (or last held) the lock of ``folder``: ``pid N on HOST since TIME``."""
    try:
        fd = open_nofollow(_lock_path(folder), os.O_RDONLY)
    except (OSError, ValueError):
        return "another process"
    with os.fdopen(fd) as f:
        return f.read(200).strip() or "another process"


@contextlib.contextmanager
def study_lock(root: str, say=print):
    """Hold the study lock of ``root`` inside the block, waiting (and saying so) while another run has it."""
    os.makedirs(root, exist_ok=True)
    fd = try_lock(root)
    if fd is None:
        say(f"another run of this study holds {_lock_path(root)} ({holder(root)}); waiting for it")
        fd = open_nofollow(_lock_path(root), os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        release(fd)


def child_environment() -> dict[str, str]:
    """The environment for a cell process that must end with this process."""
    return {**os.environ, PARENT_ENV: str(os.getpid())}


def die_with_parent() -> None:
    """End this process (SIGTERM) when the executor that started it ends; a no-op for cells run by hand.

    Linux delivers the signal itself (``PR_SET_PDEATHSIG``); a watchdog thread covers the rest (the
    parent already gone, other systems).
    """
    expected = os.environ.get(PARENT_ENV)
    if not expected or not expected.isdigit():
        return
    parent = int(expected)
    arm_parent_death_signal()
    if os.getppid() != parent:  # it died before the signal was armed
        os.kill(os.getpid(), signal.SIGTERM)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="moebench-parent-watchdog", daemon=True).start()
