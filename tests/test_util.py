"""moebench.util: names that become paths, paths kept inside their folder, atomic files and folders
on a disk that really fills up, leftovers of killed writers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import fill_disk

from moebench.util import (
    atomic_folder,
    atomic_write,
    atomic_write_text,
    check_name,
    clear_partial_folders,
    partial_folders,
    path_under,
)


@pytest.mark.parametrize("name", ["my-study", "demo", "a.b_c-1", "...x"])
def test_plain_names_pass(name):
    assert check_name(name) == name


@pytest.mark.parametrize("name, shown", [("../../x", "'../../x'"), ("/etc", "'/etc'"), ("a/b", "'a/b'"),
                                         (".", "'.'"), ("..", "'..'"), ("<b>st</b>", "'<b>st</b>'"), ("", "''"),
                                         (123, "123 (read as int, not text: quote it in YAML)")])
def test_names_that_would_leave_their_folder_are_refused_with_the_rule(name, shown):
    with pytest.raises(ValueError) as err:
        check_name(name, "study name")
    text = str(err.value)
    assert text.startswith(f"study name {shown}") and "^[A-Za-z0-9._-]+$" in text and "e.g. '" in text


def test_path_under_refuses_links_that_point_elsewhere(tmp_path):
    root, outside = tmp_path / "results", tmp_path / "elsewhere"
    root.mkdir()
    outside.mkdir()
    assert path_under(str(root), "a", "b") == os.path.join(str(root), "a", "b")
    (root / "link").symlink_to(outside)
    with pytest.raises(ValueError, match=f"resolves to {outside}/cells, outside {root};"):
        path_under(str(root), "link", "cells")
    with pytest.raises(ValueError, match="outside"):
        path_under(str(root), "..", "x")


def test_atomic_write_on_a_full_disk_names_the_folder_and_leaves_nothing(small_disk):
    fill_disk(small_disk)
    target = small_disk / "stats.pt"
    with pytest.raises(OSError, match=f"no space left on the device holding {small_disk} while writing stats.pt"):
        atomic_write(str(target), lambda tmp: torch.save({"x": torch.zeros(200_000)}, tmp))  # torch: no errno
    with pytest.raises(OSError, match="no space left on the device holding"):
        atomic_write_text(str(small_disk / "big.txt"), "x" * 100_000)  # Python: ENOSPC
    assert sorted(os.listdir(small_disk)) == ["filler"]


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "a.json"
    atomic_write_text(str(path), "old")

    def broken(tmp):
        Path(tmp).write_text("half")
        raise RuntimeError("writer failed")

    with pytest.raises(RuntimeError, match="writer failed"):
        atomic_write(str(path), broken)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["a.json"]


def test_atomic_folder_is_all_or_nothing(tmp_path, small_disk):
    out = tmp_path / "out"
    atomic_folder(str(out), lambda d: Path(d, "a").write_text("a"))
    assert os.listdir(out) == ["a"] and not partial_folders(str(out))
    with pytest.raises(ValueError, match="exists and is not empty"):
        atomic_folder(str(out), lambda d: None)
    fill_disk(small_disk)
    full = small_disk / "model"
    with pytest.raises(OSError, match=f"no space left on the device holding {small_disk} while writing model"):
        atomic_folder(str(full), lambda d: Path(d, "w.bin").write_bytes(b"x" * 100_000))
    assert sorted(os.listdir(small_disk)) == ["filler"]


def test_leftover_of_a_dead_writer_is_removed_and_a_live_one_named(tmp_path):
    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = tmp_path / f".out.partial-{dead.stdout.strip()}"
    leftover.mkdir()
    (leftover / "config.json").write_text("{}")
    assert clear_partial_folders(str(out)) == [str(leftover)] and not leftover.exists()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        busy = tmp_path / f".out.partial-{live.pid}"
        busy.mkdir()
        with pytest.raises(ValueError, match=f"process {live.pid} is writing .*out .*into .*partial-{live.pid}"):
            atomic_folder(str(out), lambda d: None)
        assert busy.exists() and not out.exists()
    finally:
        live.kill()
        live.wait()
