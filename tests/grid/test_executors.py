"""Executors: local subprocesses, and Slurm through submitit on a real single-node cluster."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from slurm_cluster import slurm_cluster  # noqa: F401  (session fixture)

from moebench.grid.executors import ExecutorResult, LocalExecutor, make_executor

# A tiny idempotent cell command: argv = [cell_dir, mode]. It records each run (start and end
# times) in runs.txt and writes DONE last. Modes: ok, fail (exit 3), busy (exit 75: held elsewhere),
# nodone (exit 0, no DONE),
# hang (sleeps), preempt (first run sends its own Slurm job the requeue signal, as a preemption
# with a warning signal does, then hangs), timeout (first run hangs until Slurm's time-limit
# signal), urgent (first run submits a job to the higher-priority partition, which preempts it).
CELL = textwrap.dedent("""
    import os, subprocess, sys, time
    d, mode = sys.argv[1], sys.argv[2]
    runs = os.path.join(d, "runs.txt")
    first = not os.path.exists(runs)
    start = time.time()
    open(os.path.join(d, "pid"), "w").write(str(os.getpid()))
    if mode == "fail":
        print("boom: this cell fails", file=sys.stderr)
        sys.exit(3)
    if mode == "busy":   # what a cell command says when another process holds the cell
        sys.exit(75)
    if mode == "hang":
        time.sleep(600)
    if first and mode in ("preempt", "timeout", "urgent"):
        open(runs, "a").write(f"{start} interrupted\\n")
        if mode == "preempt":
            task = os.environ["SLURM_ARRAY_JOB_ID"] + "_" + os.environ["SLURM_ARRAY_TASK_ID"]
            subprocess.run(["scancel", "--signal=USR2", task], check=True)
        if mode == "urgent":   # a job of the higher-priority partition takes the whole node
            subprocess.run(["sbatch", "--partition=urgent", f"--cpus-per-task={os.cpu_count()}",
                            "--output=/dev/null", "--wrap=sleep 2"], check=True)
        time.sleep(600)
        sys.exit(9)
    time.sleep(float(os.environ.get("CELL_SLEEP", "0.5")))
    open(runs, "a").write(f"{start} {time.time()}\\n")
    if mode != "nodone":
        open(os.path.join(d, "DONE"), "w").write("done\\n")
""")


def cell_command(cell_dir: str) -> list[str]:
    mode = os.path.basename(cell_dir).split("-")[0]
    return [sys.executable, "-c", CELL, cell_dir, mode]


def make_cells(root: Path, names: list[str]) -> list[str]:
    cells = []
    for name in names:
        (root / name).mkdir(parents=True)
        cells.append(str(root / name))
    return cells


def intervals(cells: list[str]) -> list[tuple[float, float]]:
    out = []
    for c in cells:
        for line in Path(c, "runs.txt").read_text().splitlines():
            start, end = line.split()
            if end != "interrupted":
                out.append((float(start), float(end)))
    return out


def max_overlap(spans: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    level = best = 0
    for _, step in events:
        level += step
        best = max(best, level)
    return best


# --- local --------------------------------------------------------------------------------------

def test_local_runs_cells_in_parallel_and_reports_failures(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CELL_SLEEP", "1.0")
    cells = make_cells(tmp_path, ["ok-a", "ok-b", "fail-c", "ok-d"])
    result = make_executor("local", parallel=2).run(cells, cell_command, desc="test grid")

    assert result.done == [cells[0], cells[1], cells[3]]
    assert result.failed == [cells[2]]
    assert "exit status 3" in result.errors[cells[2]] and "boom" in result.errors[cells[2]]
    assert result.summary(skipped=1) == "3 done, 1 skipped, 1 failed"
    assert max_overlap(intervals([cells[0], cells[1], cells[3]])) == 2
    for c in cells:   # logs, and nothing else, inside each cell folder
        assert (Path(c) / "logs" / "stdout.log").exists()
    assert "boom" in (Path(cells[2]) / "logs" / "stderr.log").read_text()
    err = capsys.readouterr().err
    assert "test grid" in err and "4/4" in err


def test_local_exit_zero_without_done_is_a_failure(tmp_path):
    cells = make_cells(tmp_path, ["nodone-a", "ok-b"])
    result = LocalExecutor().run(cells, cell_command)
    assert result.done == [cells[1]] and result.failed == [cells[0]]
    assert "no DONE" in result.errors[cells[0]]


def test_local_missing_program_is_a_failure(tmp_path):
    cells = make_cells(tmp_path, ["a"])
    result = LocalExecutor().run(cells, lambda d: [str(tmp_path / "no-such-program")])
    assert result.failed == cells and "could not start" in result.errors[cells[0]]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_local_sigterm_and_ctrl_c_stop_running_cells(tmp_path, sig):
    cells = make_cells(tmp_path, ["hang-a", "hang-b"])
    driver = textwrap.dedent(f"""
        import sys
        from moebench.grid.executors import make_executor
        sys.path[:0] = [{str(Path(__file__).parent)!r},  # this file
                        {str(Path(__file__).resolve().parents[1])!r}]  # the tests root: slurm_cluster
        from test_executors import cell_command
        make_executor("local", parallel=2).run({cells!r}, cell_command)
    """)
    proc = subprocess.Popen([sys.executable, "-c", driver], stderr=subprocess.DEVNULL)
    pid_files = [Path(c, "pid") for c in cells]
    deadline = time.time() + 60
    while not all(p.exists() and p.read_text() for p in pid_files) and time.time() < deadline:
        time.sleep(0.1)
    children = [int(p.read_text()) for p in pid_files]
    proc.send_signal(sig)
    rc = proc.wait(timeout=30)
    assert rc == (128 + signal.SIGTERM if sig == signal.SIGTERM else -signal.SIGINT)
    for pid in children:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_local_leaves_cells_held_elsewhere_alone(tmp_path):
    from moebench.grid.guard import release, try_lock

    cells = make_cells(tmp_path, ["ok-held", "busy-b", "ok-c", "ok-done"])
    Path(cells[3], "DONE").write_text("finished by another run\n")
    lock = try_lock(cells[0])  # another process's lock, as far as the executor can tell
    try:
        result = LocalExecutor().run(cells, cell_command)
    finally:
        release(lock)
    assert result.done == [cells[2]] and not result.failed
    assert result.elsewhere == [cells[0], cells[1], cells[3]]
    assert not Path(cells[0], "runs.txt").exists() and not Path(cells[0], "logs").exists()  # never started
    assert result.summary() == "1 done, 0 skipped, 0 failed, 3 running elsewhere"


def test_unknown_executor_and_option_say_did_you_mean():
    with pytest.raises(ValueError, match="did you mean 'slurm'"):
        make_executor("slurn")
    with pytest.raises(ValueError, match="did you mean 'parallel'"):
        make_executor("local", paralel=2)
    with pytest.raises(ValueError, match="did you mean 'max_parallel'"):
        make_executor("slurm", max_paralel=2)
    assert isinstance(ExecutorResult().summary(), str)


# --- slurm (a real single-node cluster) ----------------------------------------------------------

@pytest.mark.slow
def test_slurm_four_cell_grid(tmp_path, slurm_cluster, capsys):  # noqa: F811
    cells = make_cells(tmp_path / "cells", ["ok-0", "ok-1", "ok-2", "ok-3"])
    ex = make_executor("slurm", partition="debug", time_min=5, cpus_per_task=1, mem_gb=0.25,
                       max_parallel=1, log_dir=str(tmp_path / "slurm"), poll_s=0.5)
    result = ex.run(cells, cell_command, desc="slurm grid")

    assert result.done == cells, result.errors
    assert result.failed == []
    assert all(Path(c, "DONE").exists() for c in cells)
    # One job array, throttled to one task at a time by max_parallel.
    scripts = list((tmp_path / "slurm").glob("*_submission.sh"))
    assert len(scripts) == 1 and "#SBATCH --array=0-3%1" in scripts[0].read_text()
    assert max_overlap(intervals(cells)) == 1
    assert "4/4" in capsys.readouterr().err


@pytest.mark.slow
def test_slurm_failures_and_cells_held_elsewhere_are_reported(tmp_path, slurm_cluster):  # noqa: F811
    cells = make_cells(tmp_path / "cells", ["fail-a", "nodone-b", "ok-c", "busy-d"])
    ex = make_executor("slurm", time_min=5, log_dir=str(tmp_path / "slurm"), poll_s=0.5)
    result = ex.run(cells, cell_command)
    assert result.done == [cells[2]]
    assert result.failed == cells[:2]
    assert result.elsewhere == [cells[3]]  # held by another process: neither done nor failed
    assert "exited with status 3" in result.errors[cells[0]]
    assert "no DONE" in result.errors[cells[1]]
    assert "log:" in result.errors[cells[0]]


@pytest.mark.slow
def test_slurm_requeues_on_preemption_and_time_limit(tmp_path, slurm_cluster):  # noqa: F811
    # time_min=1, signal_delay_s=45: Slurm signals the coming time-out ~15-30 s into the run.
    cells = make_cells(tmp_path / "cells", ["preempt-a", "timeout-b"])
    ex = make_executor("slurm", time_min=1, signal_delay_s=45, log_dir=str(tmp_path / "slurm"),
                       poll_s=0.5)
    result = ex.run(cells, cell_command)

    assert result.done == cells, result.errors
    for c in cells:   # interrupted once, then run again in the same requeued array task
        runs = Path(c, "runs.txt").read_text().splitlines()
        assert len(runs) == 2 and runs[0].endswith("interrupted"), runs
    logs = sorted((tmp_path / "slurm").glob("*_log.out"))
    assert len(logs) == 2 and all("Requeued job" in p.read_text() for p in logs)


@pytest.mark.slow
def test_slurm_real_preemption_requeues_without_reporting_a_failure(tmp_path, slurm_cluster):  # noqa: F811
    # The urgent job preempts the cell's job: SIGTERM, 5 s of grace, killed, requeued by Slurm.
    cells = make_cells(tmp_path / "cells", ["urgent-a"])
    ex = make_executor("slurm", time_min=5, log_dir=str(tmp_path / "slurm"), poll_s=0.5)
    result = ex.run(cells, cell_command)

    assert result.done == cells, result.errors
    runs = Path(cells[0], "runs.txt").read_text().splitlines()
    assert len(runs) == 2 and runs[0].endswith("interrupted"), runs
    err = "".join(p.read_text() for p in (tmp_path / "slurm").glob("*_log.err"))
    assert "DUE TO PREEMPTION" in err and "SIGTERM from Slurm" in err
