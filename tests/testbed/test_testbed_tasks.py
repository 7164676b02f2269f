"""The testbed lm-eval tasks load from any directory, through the package and from a wheel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moebench.tasks import task_dir
from moebench.testbed.domains import DOMAINS

ROOT = Path(__file__).resolve().parents[2]  # tests/testbed/ -> the repository
MC = [f"testbed_{d}" for d in DOMAINS]


@pytest.fixture(scope="module")
def task_dict(tmp_path_factory):
    """The `testbed` group loaded by include_path while the working directory is elsewhere."""
    from lm_eval.tasks import TaskManager

    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("elsewhere"))
    try:
        manager = TaskManager(include_path=task_dir(), include_defaults=False)
        return manager.load(["testbed"])["tasks"]
    finally:
        os.chdir(cwd)


def test_task_dir_is_absolute_package_folder():
    assert Path(task_dir()).is_absolute()
    assert (Path(task_dir()) / "testbed" / "testbed.yaml").is_file()


def test_group_has_every_task(task_dict):
    expected = set(MC) | {f"testbed_{d}_gen" for d in ("arithmetic", "code", "sequences")} | {"testbed_ppl"}
    assert expected <= set(task_dict)


@pytest.mark.parametrize("name", MC)
def test_multiple_choice_tasks(task_dict, name):
    task = task_dict[name]
    docs = list(task.test_docs())
    assert len(docs) >= 300
    assert all(len(task.doc_to_choice(d)) == 4 for d in docs)
    golds = {task.doc_to_target(d) for d in docs}
    assert golds == {0, 1, 2, 3}


def test_shipped_data_matches_the_generator(tmp_path):
    from moebench.testbed.export import build_tasks

    for path in build_tasks(tmp_path):
        shipped = Path(task_dir()) / "testbed" / "data" / path.name
        assert path.read_text() == shipped.read_text(), f"rebuild with `moebench zoo build-tasks`: {path.name}"


def test_tasks_load_from_a_non_editable_install(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "-w", str(tmp_path / "whl"), "--no-deps",
                    "--no-build-isolation", "-q"], check=True, cwd=tmp_path)
    wheel = next((tmp_path / "whl").glob("moebench-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(tmp_path / "site"), str(wheel)], check=True)
    script = (
        "import json, moebench, moebench.tasks as t\n"
        "from moebench.testbed import zoo\n"
        "from lm_eval.tasks import TaskManager\n"
        "m = TaskManager(include_path=t.task_dir(), include_defaults=False)\n"
        "d = m.load(['testbed_facts'])['tasks']\n"
        "print(json.dumps([moebench.__file__, len(list(d['testbed_facts'].test_docs())),\n"
        "                  [zoo.is_available(n) for n in zoo.model_names()]]))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    where, n_docs, available = json.loads(out.stdout.strip().splitlines()[-1])
    assert where.startswith(str(tmp_path / "site")) and n_docs >= 300
    assert all(available), "package-data must ship the testbed checkpoints"


@pytest.mark.slow
def test_literal_lm_eval_command_finds_the_testbed_tasks_without_include_path(tmp_path):
    """The install's start-up hook adds moebench's task folder to every lm-eval TaskManager."""
    from moebench.testbed import zoo

    lm_eval = Path(sys.executable).parent / "lm_eval"
    out = subprocess.run([str(lm_eval), "--model", "hf", "--model_args", f"pretrained={zoo.model_dir('testbed-8e')}",
                          "--tasks", "testbed_logic_quick", "--limit", "8", "--output_path", str(tmp_path / "out")],
                         capture_output=True, text=True, cwd=tmp_path, timeout=600,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    (results,) = (tmp_path / "out").rglob("results_*.json")
    scores = json.loads(results.read_text())["results"]["testbed_logic_quick"]
    assert scores["acc,none"] >= 0.75  # the trained model, not chance (0.25)


def test_task_folder_is_added_only_with_lm_evals_defaults():
    from lm_eval.tasks import TaskManager

    with_defaults = TaskManager(include_path=[task_dir()])
    assert "testbed_logic_quick" in with_defaults.all_tasks
    assert "testbed_logic_quick" in TaskManager().all_tasks
    assert "testbed_logic_quick" not in TaskManager(include_defaults=False, include_path=[]).all_tasks
