"""Stale state: what a killed write leaves is cleared by the next one; weights rewritten in place are noticed."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

from tiny_models import tiny_model

from moebench.moe.layered import LayeredCheckpoint
from moebench.util import atomic_write_text

WRITER = """
import sys, time
from moebench.util import atomic_write
def write(tmp):
    open(tmp, "w").write("half")
    print("writing", flush=True)
    time.sleep(60)
atomic_write(sys.argv[1], write)
"""


def test_a_killed_writers_temporary_file_is_removed_by_the_next_write(tmp_path):
    target = tmp_path / "stats.pt"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "writing"
    left = [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    assert len(left) == 1 and f".{writer.pid}." in left[0]
    busy = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, text=True)
    assert busy.stdout.readline().strip() == "writing"  # a second writer that still runs
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    atomic_write_text(str(target), "whole")
    remaining = sorted(n for n in os.listdir(tmp_path) if n.endswith(".tmp"))
    assert target.read_text() == "whole"
    assert remaining == [n for n in remaining if f".{busy.pid}." in n] and len(remaining) == 1  # the live one stays
    busy.kill()
    busy.wait()


def test_weights_copied_over_with_their_times_kept_get_a_new_fingerprint(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEBENCH_CACHE", str(tmp_path / "cache"))
    a, b = tmp_path / "a", tmp_path / "b"
    tiny_model("qwen3_moe", seed=0).save_pretrained(a)
    tiny_model("qwen3_moe", seed=1).save_pretrained(b)
    first = LayeredCheckpoint(str(a)).fingerprint()
    other = LayeredCheckpoint(str(b)).fingerprint()
    assert first != other
    stamp = os.stat(a / "model.safetensors")
    time.sleep(0.01)
    shutil.copy2(b / "model.safetensors", a / "model.safetensors")  # `cp -p`: same name, size, times
    os.utime(a / "model.safetensors", ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert os.stat(a / "model.safetensors").st_size == stamp.st_size
    assert LayeredCheckpoint(str(a)).fingerprint() == other  # not the memo of the weights that were there
