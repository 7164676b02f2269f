"""`moebench bench`: every variant's row paired with what it is compared with, both experts kernels, and
skipping's ideal-vs-measured line."""

from __future__ import annotations

import re

from moebench.cli import main

QUICK = ["--reps", "3", "--warmup", "0", "--prompt-len", "8", "--new-tokens", "2", "--samples", "2", "--seq-len", "8"]
X = r"(\d+\.\d+)x(?: \[(\d+\.\d+), (\d+\.\d+)\])?"


def rows_of(out: str) -> dict[str, list[str]]:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("---")) + 1
    table = [line for line in lines[start:] if re.search(r"\d+\.\d+x", line) and ": skip rate" not in line]
    return {re.split(r"\s{2,}", line)[0]: re.split(r"\s{2,}", line)[1:] for line in table}


def test_bench_measures_unpruned_with_both_kernels_then_the_pruned_model(saved_models, corpus, capsys):
    assert main(["bench", saved_models("mixtral"), "--calib", f"file:{corpus}", "--method", "frequency",
                 "--ratio", "0.5", *QUICK]) == 0
    out = capsys.readouterr().out
    rows = rows_of(out)
    assert list(rows) == ["unpruned", "unpruned, moebench kernel", "frequency 0.5"]
    assert [row[0] for row in rows.values()] == ["grouped_mm", "moebench", "grouped_mm"]  # the kernel each ran in
    expert_mb = {name: float(row[1]) for name, row in rows.items()}
    assert expert_mb["unpruned"] == expert_mb["unpruned, moebench kernel"] > expert_mb["frequency 0.5"]
    assert all(float(row[3]) > 0 and float(row[4]) > 0 for row in rows.values())  # prefill, decode tok/s
    assert rows["unpruned"][5:8] == ["1.00x", "1.00x", "-"]  # the reference itself
    for name in ("unpruned, moebench kernel", "frequency 0.5"):
        assert rows[name][7] == "unpruned"  # each ratio is paired with the unpruned model
        for cell in rows[name][5:7]:
            median, lo, hi = (float(v) for v in re.fullmatch(X, cell).groups())
            assert 0 < lo <= median <= hi  # the median and its interval over the 3 paired repetitions
    assert re.search(r"machine while timing: \d+ threads of \d+ cores, other processes", out)


def test_bench_with_skipping_states_the_ideal_and_measured_speedup(saved_models, corpus, capsys):
    assert main(["bench", saved_models("mixtral"), "--calib", f"file:{corpus}", "--skip", "naee", *QUICK]) == 0
    out = capsys.readouterr().out
    rows = rows_of(out)
    assert list(rows) == ["unpruned", "unpruned, moebench kernel", "unpruned + skip naee"]
    assert rows["unpruned + skip naee"][0] == "moebench"
    assert rows["unpruned + skip naee"][7] == "unpruned, moebench kernel, no skip"  # same kernel, rules paused
    assert 0 < float(rows["unpruned + skip naee"][-1]) < 1  # a share of routed pairs skipped
    assert re.search(r"ideal speedup \d+\.\d+x, measured \d+\.\d+x", out)


def test_bench_method_without_a_budget_is_an_error(saved_models, capsys):
    assert main(["bench", saved_models("mixtral"), "--method", "frequency"]) == 2
    assert "--method needs a budget: --ratio R or --keep K" in capsys.readouterr().err
