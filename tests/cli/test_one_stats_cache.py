"""`moebench prune` then the literal `lm_eval --model pruned_moe`: the second run calibrates nothing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

BIN = os.path.dirname(sys.executable)


def snapshot(folder) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its inode and modification time (a rewrite changes both)."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            st = os.stat(os.path.join(root, name))
            out[os.path.relpath(os.path.join(root, name), folder)] = (st.st_ino, st.st_mtime_ns)
    return out


@pytest.mark.slow
def test_prune_then_lm_eval_share_one_statistics_folder(tmp_path):
    stats = tmp_path / "stats"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    prune = [os.path.join(BIN, "moebench"), "prune", "testbed-8e", "--method", "reap", "--ratio", "0.5",
             "--calib", "testbed:mix", "--samples", "8", "--seq-len", "64", "--stats-dir", str(stats),
             "--out", str(tmp_path / "pruned")]
    first = subprocess.run(prune, capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    before = snapshot(stats)
    assert any(name.endswith("routing.pt") for name in before)  # the prune calibrated and cached

    model_args = (f"pretrained=testbed-8e,method=reap,ratio=0.5,calib=testbed:mix,calib_samples=8,"
                  f"calib_seq_len=64,stats_dir={stats}")
    second = subprocess.run([os.path.join(BIN, "lm_eval"), "--model", "pruned_moe", "--model_args", model_args,
                             "--tasks", "testbed_logic_quick", "--limit", "8", "--batch_size", "8"],
                            capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "testbed_logic_quick" in second.stdout
    assert snapshot(stats) == before  # no new statistics folder, no file rewritten: nothing was collected
    assert "calibration" not in second.stdout + second.stderr


def task_rows(stdout: str) -> list[str]:
    """The result table's rows of the task (name, metric, value columns)."""
    return [line for line in stdout.splitlines() if "testbed_logic_quick" in line or "|acc" in line]


@pytest.mark.slow
def test_lm_eval_sequential_true_scores_as_the_in_memory_prune(tmp_path):
    """`sequential=true`: calibrated layer by layer, pruned shard by shard into the cache, then evaluated: the
    scores equal those of the model pruned in memory, and a second run reuses the pruned checkpoint."""
    stats = tmp_path / "cache" / "stats"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = (f"pretrained=testbed-8e,method=reap,ratio=0.5,calib=testbed:mix,calib_samples=8,"
            f"calib_seq_len=64,stats_dir={stats}")

    def lm_eval(extra: str) -> str:
        done = subprocess.run([os.path.join(BIN, "lm_eval"), "--model", "pruned_moe", "--model_args", base + extra,
                               "--tasks", "testbed_logic_quick", "--limit", "16", "--batch_size", "8"],
                              capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    plain, first = lm_eval(""), lm_eval(",sequential=true")
    assert task_rows(plain) and [r.split("|")[-3:] for r in task_rows(first)] == \
        [r.split("|")[-3:] for r in task_rows(plain)]
    pruned = list((tmp_path / "cache" / "pruned").iterdir())
    assert len(pruned) == 1 and (pruned[0] / "model.safetensors.index.json").exists()
    written = snapshot(pruned[0])
    assert task_rows(lm_eval(",sequential=true")) == task_rows(first)
    assert snapshot(pruned[0]) == written  # the second run evaluated the same pruned checkpoint, unrewritten
