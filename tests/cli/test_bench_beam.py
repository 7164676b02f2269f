"""`moebench bench-beam`: the beam search timed per layer at real widths, with its whole-model figure."""

from __future__ import annotations

import re

import pytest

from moebench.cli import main


def test_bench_beam_prints_seconds_per_layer_and_the_whole_model_at_its_expert_count(capsys):
    rows = []
    for layer, experts in (("qwen3-30b-a3b", "12,16"), ("mixtral-8x7b", "8,16")):
        assert main(["bench-beam", "--layers", layer, "--experts", experts, "--ratio", "0.25", "--tokens", "128",
                     "--gathered"]) == 0
        rows += [line.split() for line in capsys.readouterr().out.splitlines() if re.match(r"(qwen3|mixtral)", line)]
    assert [(r[0], r[1], r[2]) for r in rows] == [("qwen3-30b-a3b", "12", "9"), ("qwen3-30b-a3b", "16", "12"),
                                                   ("mixtral-8x7b", "8", "6"), ("mixtral-8x7b", "16", "12")]
    assert all(float(r[4]) >= 0 and "(same: yes)" in " ".join(r) for r in rows)  # Gram path keeps the same set
    assert re.search(r"\d+ s \(32 layers\)$", " ".join(rows[2]))  # Mixtral's own 8 experts: 32 layers' total
    assert rows[0][-1] == rows[1][-1] == "-"  # not Qwen3-30B's 128 experts: no whole-model figure


@pytest.mark.parametrize(("args", "message"), [
    (["--experts", "16,x"], "give comma-separated whole numbers"),
    (["--experts", "8"], "keeps 4 experts, fewer than qwen3-30b-a3b's top-8"),
    (["--layers", "gpt5"], "unknown gpt5; known: qwen3-30b-a3b, mixtral-8x7b"),
    (["--ratio", "1.5"], "--ratio 1.5 must be between 0 and 1"),
])
def test_bench_beam_rejects_bad_input_naming_the_value(args, message, capsys):
    assert main(["bench-beam", *args]) == 2
    assert message in capsys.readouterr().err
