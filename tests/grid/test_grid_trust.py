"""The grid as a user hits it when things go wrong, with real processes: concurrent runs of one
study, a runner killed with kill -9, a cell held by another process, finished cells whose files
were broken afterwards, a ratio that rounds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from test_grid import make_study

from moebench.grid.guard import holder, is_locked, release, try_lock
from moebench.grid.runner import prepare, status
from moebench.grid.spec import load_study

pytestmark = pytest.mark.slow  # real grid runs: one cell subprocess per cell


def grid(spec: str, results: str, *args: str, action: str = "run") -> list[str]:
    return [sys.executable, "-m", "moebench.cli", "grid", action, spec, "--results", results, *args]


def starts(folder: str) -> int:
    """How often a cell process began work on this cell (each start prints one line to its log)."""
    log = Path(folder, "logs", "stdout.log")
    return log.read_text().count("moebench cell: started") if log.exists() else 0


def dead(pid: int) -> bool:
    """Whether every thread of process ``pid`` has ended (a zombie counts as ended)."""
    try:
        states = [Path(t, "stat").read_text().rsplit(")", 1)[1].split()[0]
                  for t in Path(f"/proc/{pid}/task").iterdir()]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return all(state in ("Z", "X") for state in states)


def test_two_concurrent_runs_of_one_study_run_each_cell_once(tmp_path, saved_models):
    spec = make_study(tmp_path, saved_models("mixtral"))  # 6 cells, one at a time per runner
    results = str(tmp_path / "results")
    runs = [subprocess.Popen(grid(spec, results), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    outputs = [p.communicate(timeout=900) for p in runs]
    assert [p.returncode for p in runs] == [0, 0], [err[-2000:] for _, err in outputs]
    states = status(load_study(spec), os.path.join(results, "tiny"))
    assert len(states["done"]) == 6
    assert [starts(f) for f in states["done"]] == [1] * 6  # no cell ran twice
    lines = [next(line for line in out.splitlines() if line.startswith("tiny: 6 cells")) for out, _ in outputs]
    assert any("running elsewhere: " in out for out, _ in outputs), lines  # they really overlapped
    assert all(", 0 failed, " in line for line in lines), lines


def test_kill_9_of_the_runner_ends_its_cells_and_the_resumed_run_finishes(tmp_path, saved_models):
    spec = make_study(tmp_path, saved_models("mixtral"), methods=["frequency"])
    results = str(tmp_path / "results")
    root = os.path.join(results, "tiny")
    runner = subprocess.Popen(grid(spec, results), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    folders = prepare(load_study(spec), root)
    deadline = time.time() + 300
    # wait until a cell process has begun work: its lock alone is not enough, since a cell takes its lock
    # before it cleans the folder and logs its start (killed in that window, it rightly never counts a start)
    while not any(is_locked(f) and starts(f) for f in folders) and time.time() < deadline:
        time.sleep(0.1)
    (busy,) = [f for f in folders if is_locked(f) and starts(f)]
    cell_pid = int(holder(busy).split()[1])
    os.kill(runner.pid, signal.SIGKILL)  # the runner only: its cell runs in a session of its own
    runner.wait()
    deadline = time.time() + 30  # its threads may take a moment after the main one is gone
    while not (dead(cell_pid) and not is_locked(busy)) and time.time() < deadline:
        time.sleep(0.1)
    assert dead(cell_pid) and not is_locked(busy)  # the cell died with its runner, its lock with it
    done = subprocess.run(grid(spec, results), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(status(load_study(spec), root)["done"]) == 3
    assert starts(busy) == 2  # killed once, then run again from a clean folder


def test_a_cell_held_by_another_process_is_left_alone_and_reported(tmp_path, saved_models):
    spec = make_study(tmp_path, saved_models("mixtral"), methods=["frequency"], ratios=[0.25, 0.5])
    results = str(tmp_path / "results")
    folders = prepare(load_study(spec), os.path.join(results, "tiny"))
    held = folders[0]
    lock = try_lock(held)
    Path(held, "results.json").write_text("being written by the other process")
    try:
        alone = subprocess.run([sys.executable, "-m", "moebench.grid.cell", held], capture_output=True, text=True)
        assert alone.returncode == 75 and "is running elsewhere (pid" in alone.stderr
        done = subprocess.run(grid(spec, results), capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "1 done now, 0 already done, 0 failed, 1 running elsewhere" in done.stdout
        assert f"running elsewhere: frequency ratio 0.25 calib file:{tmp_path}/calib.txt" in done.stdout
        assert f"[cells/{os.path.basename(held)}]: held by another run (here, pid {os.getpid()} since" in done.stdout
        shown = subprocess.run(grid(spec, results, action="status"), capture_output=True, text=True)
        assert "1 done, 1 running, 0 failed, 0 broken, 0 pending" in shown.stdout
        assert Path(held, "results.json").read_text() == "being written by the other process"  # untouched
        assert starts(held) == 0
    finally:
        release(lock)
    assert subprocess.run(grid(spec, results), capture_output=True, timeout=900).returncode == 0
    assert starts(held) == 1 and json.loads(Path(held, "results.json").read_text())["results"]


def test_broken_finished_cells_are_named_skipped_or_redone(tmp_path, saved_models):
    spec = make_study(tmp_path, saved_models("mixtral"), methods=["frequency"])
    results = str(tmp_path / "results")
    root = os.path.join(results, "tiny")
    assert subprocess.run(grid(spec, results), capture_output=True, timeout=900).returncode == 0
    a, b, c = status(load_study(spec), root)["done"]
    collect = [sys.executable, "-m", "moebench.cli", "collect", root]

    Path(a, "results.json").write_text("garbage{")
    shown = subprocess.run(grid(spec, results, action="status"), capture_output=True, text=True)
    (line,) = [line for line in shown.stdout.splitlines() if line.strip().startswith("broken ")]
    assert "frequency ratio" in line and f"[cells/{os.path.basename(a)}]" in line
    assert ": results.json is not readable JSON (Expecting value" in line
    skip = subprocess.run([*collect, "--skip-broken"], capture_output=True, text=True)
    assert skip.returncode == 0 and f"skipped broken cell {a}: results.json is not readable JSON" in skip.stderr
    assert sorted(pd.read_csv(os.path.join(root, "tables", "runs.csv"))["cell"]) == sorted(
        os.path.basename(f) for f in (b, c))
    assert not Path(a, "DONE").exists() and "broken" in json.loads(Path(a, "failure.json").read_text())

    results_b = json.loads(Path(b, "results.json").read_text())
    results_b["versions"] = {task: [1, 0] for task in results_b["versions"]}  # a wrong value type
    Path(b, "results.json").write_text(json.dumps(results_b))
    refused = subprocess.run(collect, capture_output=True, text=True)
    assert refused.returncode == 2 and "differ in task_versions" not in refused.stderr
    assert f"{b}: results.json: versions['testbed_logic']='[1, 0]' is not a version number" in refused.stderr
    assert "moebench grid run SPEC" in refused.stderr and not Path(b, "DONE").exists()

    Path(c, "cell.json").write_text(Path(c, "cell.json").read_text()[:40])  # truncated; grid run finds it
    again = subprocess.run(grid(spec, results), capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-2000:]
    (line,) = [line for line in again.stdout.splitlines() if line.strip().startswith("redone: ")]
    assert f"[cells/{os.path.basename(c)}] held broken results (cell.json is not readable JSON" in line
    assert "3 done now" in again.stdout and [starts(f) for f in (a, b, c)] == [2, 2, 2]
    assert subprocess.run(collect, capture_output=True).returncode == 0
    assert len(pd.read_csv(os.path.join(root, "tables", "runs.csv"))) == 3


def test_a_rounded_ratio_is_recorded_and_lm_eval_keys_reach_simple_evaluate(tmp_path, saved_models):
    spec = make_study(tmp_path, saved_models("deepseek_v3"), methods=["frequency"], ratios=[0.3],
                      lm_eval={"limit": 4, "batch_size": 8, "bootstrap_iters": 0})
    results = str(tmp_path / "results")
    done = subprocess.run(grid(spec, results), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    (folder,) = status(load_study(spec), os.path.join(results, "tiny"))["done"]
    note = ("ratio=0.3 is rounded to whole experts and equal drops per routing group: 6 of 8 experts kept per "
            "MoE layer, a realised ratio of 0.25")
    cell = json.loads(Path(folder, "cell.json").read_text())
    assert cell["moebench"]["ratio_realised"] == 0.25 and cell["moebench"]["budget_note"] == note
    assert cell["spec"]["ratio"] == 0.3
    lm = json.loads(Path(folder, "results.json").read_text())
    assert lm["config"]["moebench"]["budget_note"] == note and lm["config"]["bootstrap_iters"] == 0
    assert note in Path(folder, "logs", "stderr.log").read_text()  # said in the cell's log
    assert yaml.safe_load(Path(spec).read_text())["ratios"] == [0.3]
