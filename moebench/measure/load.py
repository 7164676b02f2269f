"""How busy the machine was while something was timed, and one timing slot per machine and user.

`CpuLoad` records, around a timed phase: the 1-minute load average before and after (as the
operating system reports it), the machine's cores, this process's compute threads, and
``others_cpu``: the cores other processes kept busy on average during the phase, from the
machine's busy CPU time (``/proc/stat``) minus this process's own (``os.times``). The phase counts
as **under load** when this process's threads plus ``others_cpu`` exceed the cores (+0.1 for the
kernel's 10 ms accounting), i.e. when it could not have every core it asked for, or when other
processes kept more than a quarter of the cores busy (ours: on a 2-core VM one busy neighbour
process on the other core scattered paired ratios from 0.5 to 3, through shared caches and memory).
The load average is recorded but does not decide: it lags by a minute and counts this process's
own earlier work.

`Slot`: a lock file per user in the system's temporary folder (`slot_path`). Cell processes hold it
shared from their start (before their imports) while they load and evaluate, and exclusively while
they time, so on one machine no two moebench processes of a user time at once and none works while
another times. (This module imports nothing heavy, so a cell can take the slot first.)
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
import time
from contextlib import contextmanager

log = logging.getLogger(__name__)
SLACK_CORES = 0.1
NEIGHBOUR_SHARE = 0.25


def _busy_seconds() -> float | None:
    """Seconds all CPUs of the machine spent busy since boot (None without ``/proc/stat``)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


class CpuLoad:
    """Context manager: how busy the machine was during the block (see the module docstring)."""

    def __enter__(self):
        self.load_before = _loadavg()
        self._busy, self._own, self._wall = _busy_seconds(), _own_seconds(), time.monotonic()
        return self

    def __exit__(self, *exc):
        wall = max(time.monotonic() - self._wall, 1e-9)
        busy = _busy_seconds()
        own = _own_seconds() - self._own
        self.load_after = _loadavg()
        self.others_cpu = None if busy is None or self._busy is None else max(0.0, (busy - self._busy - own) / wall)
        return False

    def record(self) -> dict:
        """``load_before``, ``load_after``, ``cpu_cores``, ``threads``, ``others_cpu``, ``under_load``."""
        import torch

        cores, threads = os.cpu_count() or 1, torch.get_num_threads()
        under = None if self.others_cpu is None else (threads + self.others_cpu > cores + SLACK_CORES
                                                      or self.others_cpu > NEIGHBOUR_SHARE * cores)
        return {"load_before": self.load_before, "load_after": self.load_after, "cpu_cores": cores,
                "threads": threads, "others_cpu": self.others_cpu, "under_load": under}


def slot_path() -> str:
    """The lock file shared by this user's moebench processes on this machine."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return os.path.join(tempfile.gettempdir(), f"moebench-timing-{uid}.lock")


class Slot:
    """This process's hold on the timing slot: `shared` while working, `exclusive` while timing.

    ``wait_s``: how long `exclusive` waits for the other holders before timing anyway (with a warning;
    the load record then says whether they disturbed it), so a forgotten holder never blocks forever.
    """

    def __init__(self, path: str | None = None, wait_s: float = 900.0):
        self.path, self.wait_s = path or slot_path(), wait_s
        self.fd, self.held = None, None
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            if os.fstat(fd).st_uid != (os.getuid() if hasattr(os, "getuid") else 0):
                os.close(fd)
                raise PermissionError(f"{self.path} belongs to another user")
            self.fd = fd
        except OSError as err:  # timing still happens; the load record says whether it was disturbed
            log.warning("moebench: no timing slot (%s); timing is not kept apart from other moebench processes", err)

    def shared(self) -> None:
        """Hold the slot shared (blocks while another process times)."""
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_SH)
            self.held = "shared"

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            self.held = None

    def _exclusive(self) -> float:
        start = time.monotonic()
        while True:  # converting a shared lock releases it first, so two converters never deadlock
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return time.monotonic() - start
            except BlockingIOError:
                if time.monotonic() - start > self.wait_s:
                    log.warning("moebench: the timing slot %s was held by others for %.0fs; timing anyway",
                                self.path, self.wait_s)
                    return -1.0
                time.sleep(0.05)

    @contextmanager
    def exclusive(self):
        """Inside: no other moebench process of this user on this machine works or times. Afterwards the
        slot is held as before (shared, or not at all)."""
        before = self.held
        waited = self._exclusive() if self.fd is not None else 0.0
        if waited > 1:
            log.info("moebench: waited %.1fs for the timing slot", waited)
        try:
            yield waited
        finally:
            if before == "shared":
                self.shared()
            else:
                self.release()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd, self.held = None, None
