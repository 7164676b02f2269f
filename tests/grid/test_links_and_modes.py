"""Shared folders: planted links are refused, never written through; files follow the umask; --out checked first.

As a hostile co-user of a shared results folder would: real symbolic links to a victim file (or
folder) outside, then the commands a user runs. The victim must be unchanged and the error must
name the link.
"""

from __future__ import annotations

import os
import stat
import sys
import warnings

import pytest
from conftest import build_tokenizer
from tiny_models import tiny_model

from moebench.cli import main
from moebench.grid import guard
from moebench.grid.results import finished_cells
from moebench.util import LinkRefused, atomic_write_text

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "report"))
from test_report import make_results


@pytest.fixture
def victim(tmp_path):
    path = tmp_path / "victim" / "precious.txt"
    path.parent.mkdir()
    path.write_text("do not touch\n")
    return path


def test_a_planted_lock_link_is_refused_and_the_target_untouched(tmp_path, victim):
    cell = tmp_path / "results" / "study" / "cells" / "abc"
    cell.mkdir(parents=True)
    (cell / guard.LOCK_FILE).symlink_to(victim)
    with pytest.raises(LinkRefused, match="is a symbolic link"):
        guard.try_lock(str(cell))
    with pytest.raises(LinkRefused):
        guard.is_locked(str(cell))
    with pytest.raises(LinkRefused), guard.study_lock(str(cell)):
        pass
    assert guard.holder(str(cell)) == "another process"  # the link's target is not read either
    assert victim.read_text() == "do not touch\n"


def test_a_linked_cell_folder_is_left_out_of_collect(tmp_path, victim):
    outside = tmp_path / "elsewhere" / "cell"
    outside.mkdir(parents=True)
    (outside / "DONE").write_text("x\n")
    cells = tmp_path / "results" / "study" / "cells"
    cells.mkdir(parents=True)
    (cells / "linked").symlink_to(outside, target_is_directory=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert finished_cells(str(tmp_path / "results")) == []
    assert any("symbolic link" in str(w.message) for w in caught)
    assert main(["collect", str(tmp_path / "results")]) in (0, 2)
    assert (outside / "DONE").exists() and not (outside / "failure.json").exists()  # never reopened


def test_tables_and_leaderboard_are_not_written_through_links(tmp_path, victim, capsys):
    results = tmp_path / "results"
    make_results(str(results), small=True)
    out = tmp_path / "reports"
    out.mkdir()
    (out / "leaderboard.md").symlink_to(victim)
    assert main(["leaderboard", str(results), "--out", str(out)]) == 2
    assert "leaderboard.md is a symbolic link" in capsys.readouterr().err
    assert victim.read_text() == "do not touch\n"
    (out / "leaderboard.md").unlink()
    assert main(["leaderboard", str(results), "--out", str(out)]) == 0
    # a path that resolves outside the named folder through a linked sub-folder
    (results / "toy" / "sub").symlink_to(victim.parent, target_is_directory=True)
    with pytest.raises(LinkRefused, match="outside"):
        atomic_write_text(str(results / "toy" / "sub" / "precious.txt"), "x", root=str(results))
    assert victim.read_text() == "do not touch\n"


@pytest.fixture
def tiny_folder(tmp_path):
    folder = tmp_path / "model"
    tiny_model("qwen3_moe").save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return folder


def test_prune_output_follows_the_umask(tiny_folder, tmp_path, corpus):
    old = os.umask(0o022)
    try:
        import moebench.util as util

        util._UMASK = None
        out = tmp_path / "pruned"
        assert main(["prune", str(tiny_folder), "--method", "frequency", "--ratio", "0.5", "--calib",
                     f"file:{corpus}", "--samples", "4", "--seq-len", "16", "--device", "cpu",
                     "--stats-dir", str(tmp_path / "stats"), "--out", str(out)]) == 0
    finally:
        os.umask(old)
        util._UMASK = None
    modes = {name: stat.S_IMODE(os.stat(out / name).st_mode) for name in os.listdir(out)}
    assert modes and all(mode == 0o644 for mode in modes.values()), modes  # plan.json, README.md, shards, ...
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o755


def test_an_out_link_is_refused_before_any_work(tiny_folder, tmp_path, corpus, capsys):
    target = tmp_path / "target"
    target.mkdir()
    (tmp_path / "out").symlink_to(target, target_is_directory=True)
    assert main(["prune", str(tiny_folder), "--method", "frequency", "--ratio", "0.5", "--calib",
                 f"file:{corpus}", "--samples", "4", "--seq-len", "16", "--device", "cpu",
                 "--stats-dir", str(tmp_path / "stats"), "--out", str(tmp_path / "out")]) == 2
    assert "is a symbolic link" in capsys.readouterr().err
    assert not (tmp_path / "stats").exists()  # refused before loading or calibrating


def test_a_parameter_given_twice_or_a_negative_seed_is_refused(tiny_folder, tmp_path, capsys):
    common = ["prune", str(tiny_folder), "--ratio", "0.5", "--device", "cpu", "--out", str(tmp_path / "o")]
    assert main([*common, "--method", "random", "--param", "seed=1", "--param", "seed=2"]) == 2
    assert "--param seed is given twice (seed=1 and seed=2)" in capsys.readouterr().err
    assert main([*common, "--method", "random", "--param", "seed=-5"]) == 2
    assert "seed" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_model_args_given_twice_are_refused_before_loading(tmp_path):
    import subprocess

    from moebench.eval.args import repeated_in_command_line, repeated_keys

    assert repeated_keys("pretrained=testbed-8e,method=reap,pretrained=/etc").startswith(
        "model_args: pretrained is given twice (pretrained=testbed-8e and pretrained=/etc)")
    assert repeated_keys("pretrained=a,method=reap,ratio=0.5") is None
    assert repeated_in_command_line(["--model", "pruned_moe", "-a", "pretrained=a", "method=reap", "pretrained=b",
                                     "--tasks", "x"]) is not None
    done = subprocess.run([sys.executable, "-m", "moebench.cli", "lm-eval", "--model", "pruned_moe", "--model_args",
                           "pretrained=testbed-8e,method=frequency,ratio=0.5,pretrained=/etc", "--tasks",
                           "testbed_logic_quick", "--limit", "2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "pretrained is given twice" in done.stderr and "Traceback" not in done.stderr
    from moebench.eval.model import PrunedMoELM

    with pytest.raises(ValueError, match="method is given twice"):
        PrunedMoELM.create_from_arg_string("pretrained=testbed-8e,method=reap,method=frequency")
