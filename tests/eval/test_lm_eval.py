"""lm-eval's `pruned_moe` model, end to end and offline: a tiny saved Mixtral and local tasks.

The literal `lm_eval` command runs in fresh processes (`--model pruned_moe` and `--model hf`);
the rest goes through `lm_eval.simple_evaluate(model="pruned_moe", ...)` in this process.
"""

from __future__ import annotations

import base64
import glob
import hashlib
import json
import os
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from tiny_lm_eval import loglikelihoods, responses, words, write_tasks

ROOT = Path(__file__).resolve().parents[2]  # tests/eval/ -> the repository
BIN = Path(sys.executable).parent
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def env(tmp_path_factory, saved_models):
    root = tmp_path_factory.mktemp("lm_eval")
    write_tasks(root / "tasks")
    rng = random.Random(0)
    (root / "calib.txt").write_text("\n\n".join(words(rng, 40) for _ in range(20)))
    model = saved_models("mixtral")
    calib = f"calib=file:{root / 'calib.txt'},calib_samples=4,calib_seq_len=16,stats_dir={root / 'stats'}"
    return SimpleNamespace(root=root, tasks=str(root / "tasks"), model=model, calib=calib)


def evaluate(env, model: str, model_args, tasks=("tiny_mc",), limit=8, **kwargs) -> dict:
    """`lm_eval.simple_evaluate` on the local tasks, samples logged, no bootstrap."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=list(tasks), limit=limit,
                                   task_manager=TaskManager(include_path=env.tasks, include_defaults=False),
                                   device="cpu", batch_size=4, bootstrap_iters=0, log_samples=True, **kwargs)


def metrics(results: dict) -> dict:
    return {task: {k: v for k, v in values.items() if "stderr" not in k}
            for task, values in results["results"].items()}


# ----- the literal `lm_eval` command in fresh processes -------------------------------------------

@pytest.fixture(scope="module")
def cli_runs(env):
    """`lm_eval --model pruned_moe` and `lm_eval --model hf`, same output folder and --use_cache file."""
    common = ["--tasks", "tiny_mc", "--include_path", env.tasks, "--device", "cpu", "--batch_size", "4",
              "--limit", "8", "--output_path", str(env.root / "out"), "--use_cache", str(env.root / "cli_cache")]
    runs = {}
    for name, model, args in (("hf", "hf", f"pretrained={env.model}"),
                              ("pruned", "pruned_moe", f"pretrained={env.model},method=reap,ratio=0.5,{env.calib}")):
        runs[name] = subprocess.run([str(BIN / "lm_eval"), "--model", model, "--model_args", args, *common],
                                    capture_output=True, text=True, env={**os.environ, **OFFLINE}, cwd=env.root)
    return runs


def _results(folder: Path) -> dict:
    (path,) = folder.glob("results_*.json")
    return json.loads(path.read_text())


@pytest.mark.slow
def test_literal_lm_eval_command_runs_pruned_moe(env, cli_runs):
    run = cli_runs["pruned"]
    assert run.returncode == 0, run.stderr[-3000:]
    folders = [p.name for p in (env.root / "out").iterdir()]
    (tagged,) = [f for f in folders if "__reap-r0.5-" in f]
    info = _results(env.root / "out" / tagged)["config"]["moebench"]
    assert info["method"] == "reap" and info["ratio"] == 0.5 and info["calib"].startswith("file-calib")
    assert info["experts_per_layer"] == {"0": 4, "1": 4}
    assert info["parameters"]["after"] < info["parameters"]["before"]


@pytest.mark.slow
def test_literal_lm_eval_command_still_runs_hf_with_moebench_installed(env, cli_runs):
    run = cli_runs["hf"]
    assert run.returncode == 0, run.stderr[-3000:]
    plain = env.model.replace("/", "__")
    results = _results(env.root / "out" / plain)
    assert "moebench" not in results["config"] and 0.0 <= results["results"]["tiny_mc"]["acc,none"] <= 1.0


@pytest.mark.slow
def test_variants_get_their_own_output_folder_and_cache_table(env, cli_runs):
    assert all(run.returncode == 0 for run in cli_runs.values())
    assert len(list((env.root / "out").iterdir())) == 2
    with sqlite3.connect(env.root / "cli_cache_rank0.db") as db:
        tables = {name: db.execute(f'SELECT COUNT(*) FROM "{name}"').fetchone()[0]
                  for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables["unnamed"] == 32  # hf: 8 documents x 4 choices
    assert [n for n, rows in tables.items() if n.startswith("pruned_moe-") and rows == 32]


# ----- the Python API --------------------------------------------------------------------------------

def test_method_none_gives_exactly_the_hf_numbers(env):
    tasks = ("tiny_mc", "tiny_ppl", "tiny_gen")
    hf = evaluate(env, "hf", {"pretrained": env.model}, tasks)
    none = evaluate(env, "pruned_moe", {"pretrained": env.model, "method": "none"}, tasks)
    assert responses(none) == responses(hf)
    assert metrics(none) == metrics(hf)
    info = none["config"]["moebench"]
    assert info["method"] == "none" and info["parameters"]["before"] == info["parameters"]["after"]
    assert none["config"]["model_num_parameters"] == hf["config"]["model_num_parameters"]


def test_ratio_half_removes_the_expected_parameters(env):
    result = evaluate(env, "pruned_moe", f"pretrained={env.model},method=reap,ratio=0.5,{env.calib}")
    info = result["config"]["moebench"]
    # Tiny Mixtral: 2 MoE layers of 8 experts; one expert = gate_up [128, 32] + down [32, 64] + a router row [32].
    per_expert = 128 * 32 + 32 * 64 + 32
    assert info["experts_per_layer"] == {"0": 4, "1": 4}
    assert info["parameters"]["before"] - info["parameters"]["after"] == 2 * 4 * per_expert
    assert info["expert_bytes"]["after"] * 2 == info["expert_bytes"]["before"]
    assert result["config"]["model_num_parameters"] == info["parameters"]["after"]
    assert all(len(ids) == 4 for ids in info["kept_experts"].values())


def test_apply_mask_equals_apply_physical(env):
    args = f"pretrained={env.model},method=frequency,ratio=0.5,{env.calib}"
    physical = evaluate(env, "pruned_moe", args, ("tiny_mc", "tiny_ppl"))
    masked = evaluate(env, "pruned_moe", args + ",apply=mask", ("tiny_mc", "tiny_ppl"))
    assert loglikelihoods(masked) == pytest.approx(loglikelihoods(physical), abs=1e-5)
    ppl = [responses(r)["tiny_ppl"] for r in (masked, physical)]
    assert [x[0][0] for x in ppl[0]] == pytest.approx([x[0][0] for x in ppl[1]], abs=1e-4)
    m, p = masked["config"]["moebench"], physical["config"]["moebench"]
    assert m["kept_experts"] == p["kept_experts"]
    assert m["parameters"]["after"] == m["parameters"]["before"]  # masking frees nothing
    assert m["parameters"]["if_pruned"] == p["parameters"]["after"]
    assert m["expert_bytes"]["if_pruned"] == p["expert_bytes"]["after"]
    unpruned = evaluate(env, "hf", {"pretrained": env.model})
    assert loglikelihoods(physical) != pytest.approx(loglikelihoods(unpruned), abs=1e-3)


def test_use_cache_never_serves_another_variants_responses(env):
    cache = str(env.root / "py_cache")
    reap = f"pretrained={env.model},method=reap,ratio=0.5,{env.calib}"
    hf = evaluate(env, "hf", {"pretrained": env.model}, use_cache=cache)
    fresh = evaluate(env, "pruned_moe", reap)
    first = evaluate(env, "pruned_moe", reap, use_cache=cache)
    assert loglikelihoods(first) == loglikelihoods(fresh) != loglikelihoods(hf)
    second = evaluate(env, "pruned_moe", reap, use_cache=cache)  # answered from its own table
    assert loglikelihoods(second) == loglikelihoods(fresh)
    quarter = evaluate(env, "pruned_moe", reap.replace("ratio=0.5", "ratio=0.25"), use_cache=cache)
    assert loglikelihoods(quarter) != loglikelihoods(fresh)
    with sqlite3.connect(f"{cache}_rank0.db") as db:
        tables = [n for (n,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    ids = {r["config"]["moebench"]["variant_id"] for r in (first, second, quarter)}
    assert len(ids) == 2 and sorted(tables) == sorted(["unnamed", *(f"pruned_moe-{i}" for i in ids)])


def test_output_folder_names_the_variant_and_results_keep_the_typed_args(env):
    from lm_eval.loggers import EvaluationTracker

    names = []
    for ratio in (0.25, 0.5):
        tracker = EvaluationTracker(output_path=str(env.root / "py_out"))
        args = {"pretrained": env.model, "method": "reap", "ratio": ratio,
                **dict(kv.split("=", 1) for kv in env.calib.split(","))}
        result = evaluate(env, "pruned_moe", args, evaluation_tracker=tracker)
        tracker.save_results_aggregated(results=result, samples=None)
        assert args["pretrained"] == env.model == result["config"]["model_args"]["pretrained"]
        names.append(tracker.general_config_tracker.model_name)
    assert names[0] != names[1] and all(n.startswith(env.model + "__reap-r0.") for n in names)
    assert len(list((env.root / "py_out").iterdir())) == 2


def test_nothing_is_calibrated_or_changed_until_the_first_request(env, tmp_path, monkeypatch):
    from lm_eval.api.instance import Instance

    import moebench.calib.cache as stats_cache
    from moebench.eval.model import PrunedMoELM
    from moebench.moe.view import MoEView

    passes = []
    real = stats_cache.collect
    monkeypatch.setattr(stats_cache, "collect", lambda *a, **k: passes.append(1) or real(*a, **k))
    args = dict(kv.split("=", 1) for kv in env.calib.split(","))
    args["stats_dir"] = str(tmp_path / "stats")
    lm = PrunedMoELM(pretrained=env.model, method="reap", ratio=0.5, device="cpu", **args)
    assert set(MoEView(lm.model).experts_per_layer.values()) == {8}
    assert lm.record is None and passes == [] and not (tmp_path / "stats").exists()
    request = Instance("loglikelihood", {}, ("w5 w6 w7", " w8"), 0)
    lm.loglikelihood([request])
    assert set(MoEView(lm.model).experts_per_layer.values()) == {4} and passes == [1]
    again = PrunedMoELM(pretrained=env.model, method="reap", ratio=0.5, device="cpu", **args)
    again.loglikelihood([request])
    assert passes == [1] and again.record["kept_experts"] == lm.record["kept_experts"]  # statistics from the cache


@pytest.mark.parametrize("extra, message", [
    ("method=reap,ratoi=0.5", r"unknown model_args 'ratoi' \(did you mean 'ratio'\?\)"),
    ("method=reapp,ratio=0.5", r"unknown method 'reapp' \(did you mean 'reap'\?\)"),
    ("method=naee,ratio=0.5,beam_widht=4", r"'beam_widht' \(did you mean 'beam_width'\?\)"),
    ("method=reap,ratio=0.5,dtpye=float32", r"'dtpye' \(did you mean 'dtype'\?\)"),
    ("method=naee,ratio=0.5,skip=fast", r"skip=fast: choose skip=none or skip=naee"),
    ("skip_beta=0.5", r"skip_beta=0.5: give it with skip=naee"),
    ("method=reap,ratio=1.5", r"ratio=1.5 must be in \[0, 1\)"),
    ("method=reap,ratio=0.9", r"leaves 1 experts but the router selects top_k=2"),
    ("method=reap", r"needs exactly one budget"),
    ("ratio=0.5", r"ratio/keep need a method"),
    ("method=reap,ratio=0.5,apply=soft", r"apply=soft: choose apply=physical"),
    ("method=reap,ratio=0.5,calib=c5", r"unknown calibration source 'c5' \(did you mean 'c4'"),
    ("method=m_smoe,ratio=0.5,apply=mask", r"merges experts .*apply=mask cannot express: use apply=physical"),
    ("method=naee,ratio=0.5,subsample_tokens=-1", r"subsample_tokens=-1 must be >= 0"),
])
def test_bad_model_args_are_clear_errors(env, extra, message):
    given = {kv.split("=", 1)[0] for kv in extra.split(",")}
    calib = ",".join(kv for kv in env.calib.split(",") if kv.split("=", 1)[0] not in given)  # each key once
    with pytest.raises(ValueError, match=message):
        evaluate(env, "pruned_moe", f"pretrained={env.model},{calib},{extra}")


def test_merge_methods_run_and_equal_their_saved_checkpoints(env, tmp_path):
    """pruned_moe with hc_smoe computes what plain hf computes on `moebench prune`'s merged checkpoint (its plain,
    duplicated layout: every router row kept, each slot a copy of its merged expert)."""
    from moebench.cli import main

    merged = evaluate(env, "pruned_moe", f"pretrained={env.model},method=hc_smoe,ratio=0.5,{env.calib}")
    out = tmp_path / "hc_smoe"
    assert main(["prune", env.model, "--method", "hc_smoe", "--ratio", "0.5", "--calib",
                 f"file:{env.root / 'calib.txt'}", "--samples", "4", "--seq-len", "16",
                 "--stats-dir", str(env.root / "stats"), "--out", str(out), "--layout", "duplicated"]) == 0
    plain = evaluate(env, "hf", {"pretrained": str(out)})
    assert loglikelihoods(merged) == pytest.approx(loglikelihoods(plain), abs=1e-5)
    assert merged["config"]["moebench"]["experts_per_layer"] == {"0": 4, "1": 4}
    m_smoe = evaluate(env, "pruned_moe", f"pretrained={env.model},method=m_smoe,ratio=0.5,{env.calib}")
    assert sum(m_smoe["config"]["moebench"]["experts_per_layer"].values()) == 8  # global budget: the total
    unpruned = evaluate(env, "hf", {"pretrained": env.model})
    assert loglikelihoods(m_smoe) != pytest.approx(loglikelihoods(unpruned), abs=1e-3)


def test_statistics_settings_come_from_model_args(env):
    """subsample_tokens / ratio_samples reach the plan request (the cache key) and the variant's identity;
    left out, the variant keeps the name it had before these settings existed."""
    from moebench.eval.model import PrunedMoELM

    args = dict(kv.split("=", 1) for kv in env.calib.split(","))
    plain = PrunedMoELM(pretrained=env.model, method="naee", ratio=0.5, device="cpu", **args)
    every = PrunedMoELM(pretrained=env.model, method="naee", ratio=0.5, device="cpu", subsample_tokens=0,
                        ratio_samples=100, **args)
    settings = every.request.collect_settings()
    assert (settings.subsample_tokens, settings.ratio_samples) == (0, 100)
    assert plain.request.collect_settings().subsample_tokens == 2048
    assert every.variant_id != plain.variant_id


def test_method_parameters_come_from_model_args(env):
    one = evaluate(env, "pruned_moe", f"pretrained={env.model},method=random,keep=4,seed=1")
    two = evaluate(env, "pruned_moe", f"pretrained={env.model},method=random,keep=4,seed=2")
    assert one["config"]["moebench"]["params"] == {"seed": 1}
    assert one["config"]["moebench"]["kept_experts"] != two["config"]["moebench"]["kept_experts"]
    premoe = evaluate(env, "pruned_moe", f"pretrained={env.model},method=premoe,ratio=0.25,confidence=0.8,"
                                         f"{env.calib}")
    assert premoe["config"]["moebench"]["params"]["confidence"] == 0.8


def test_moebench_lm_eval_shim(env):
    from moebench.cli import main

    out = env.root / "shim_out"
    code = main(["lm-eval", "--model", "pruned_moe", "--model_args",
                 f"pretrained={env.model},method=frequency,ratio=0.25,{env.calib}", "--tasks", "tiny_mc",
                 "--include_path", env.tasks, "--device", "cpu", "--limit", "4", "--output_path", str(out)])
    assert code == 0
    (folder,) = out.iterdir()
    assert "__frequency-r0.25-" in folder.name
    assert _results(folder)["config"]["moebench"]["experts_per_layer"] == {"0": 6, "1": 6}


# ----- registration and packaging -------------------------------------------------------------------

def test_registration_in_a_fresh_process_is_lazy_and_keeps_builtin_models(tmp_path):
    code = ("import sys\n"
            "heavy = [m for m in ('moebench', 'torch', 'transformers', 'lm_eval') if m in sys.modules]\n"
            "hooked = 'moebench_lm_eval_hook' in sys.modules\n"
            "from importlib.metadata import entry_points\n"
            "from lm_eval.api.registry import get_model\n"
            "(ep,) = entry_points(group='lm_eval.models', name='pruned_moe')\n"
            "print(heavy, hooked, get_model('pruned_moe').__name__, get_model('hf').__name__, "
            "get_model('dummy').__name__, ep.load() is get_model('pruned_moe'))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **OFFLINE},
                         cwd=tmp_path)  # not the checkout: a build's leftover *.egg-info there would shadow metadata
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["[]", "True", "PrunedMoELM", "HFLM", "DummyLM", "True"]


def _wheel_has_pth(wheel: Path) -> None:
    from moebench._packaging import PTH_NAME, PTH_TEXT

    with zipfile.ZipFile(wheel) as z:
        assert z.read(PTH_NAME).decode() == PTH_TEXT
        (record,) = [n for n in z.namelist() if n.endswith(".dist-info/RECORD")]
        (entry_points,) = [n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt")]
        digest = base64.urlsafe_b64encode(hashlib.sha256(PTH_TEXT.encode()).digest()).rstrip(b"=").decode()
        assert f"{PTH_NAME},sha256={digest},{len(PTH_TEXT)}" in z.read(record).decode().splitlines()
        assert "pruned_moe = moebench.eval.model:PrunedMoELM" in z.read(entry_points).decode()
        # The hook module itself: a file in the wheel, or mapped by the editable wheel's finder.
        assert any(n == "moebench_lm_eval_hook.py" or "'moebench_lm_eval_hook'" in z.read(n).decode()
                   for n in z.namelist() if n.endswith(".py"))


def test_wheel_and_editable_wheel_ship_the_registration_pth(tmp_path):
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split("\n")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    for hook in ("build_wheel", "build_editable"):  # what `pip install .` and `pip install -e .` call
        build = f"import sys, setuptools.build_meta as b; b.{hook}(sys.argv[1])"
        run = subprocess.run([sys.executable, "-c", build, str(tmp_path / "dist")], cwd=src, capture_output=True,
                             text=True)
        assert run.returncode == 0, run.stderr[-3000:]
    wheels = sorted(glob.glob(str(tmp_path / "dist" / "*.whl")))
    assert len(wheels) == 2 and any("editable" in w for w in wheels)
    for wheel in wheels:
        _wheel_has_pth(Path(wheel))


def test_pth_line_installs_the_top_level_hook():
    import moebench_lm_eval_hook
    from moebench._packaging import HOOK_MODULE, PTH_NAME, PTH_TEXT

    assert PTH_NAME[0].islower() and PTH_TEXT.startswith("import ") and PTH_TEXT.count("\n") == 1
    assert f"__import__('{HOOK_MODULE}').install()" in PTH_TEXT and moebench_lm_eval_hook.__name__ == HOOK_MODULE
    assert "." not in HOOK_MODULE and callable(moebench_lm_eval_hook.install)


def test_testbed_smoke(tmp_path):
    """Optional: the first trained testbed model on one shipped testbed task, when both are present."""
    from moebench.testbed.zoo import is_available, model_names

    tasks = ROOT / "tasks" / "testbed"
    names = [n for n in model_names() if is_available(n)]
    if not names or not (tasks / "testbed_facts.yaml").is_file():
        pytest.skip("no trained testbed model or testbed tasks in this checkout")
    import lm_eval
    from lm_eval.tasks import TaskManager

    result = lm_eval.simple_evaluate(
        model="pruned_moe", model_args=f"pretrained={names[0]},method=frequency,ratio=0.25,calib=testbed:mix,"
                                       f"calib_samples=8,calib_seq_len=64,stats_dir={tmp_path}",
        tasks=["testbed_facts"], limit=8,
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False), device="cpu",
        bootstrap_iters=0)
    assert 0.0 <= result["results"]["testbed_facts"]["acc,none"] <= 1.0


def test_skip_beta_zero_equals_no_skipping_and_median_skips_half(env):
    """skip=naee: beta 0 gives the unskipped responses; the median beta skips about half the second slots."""
    plain = evaluate(env, "pruned_moe", f"pretrained={env.model},{env.calib},method=reap,ratio=0.25")
    zero = evaluate(env, "pruned_moe", f"pretrained={env.model},{env.calib},method=reap,ratio=0.25,"
                                       "skip=naee,skip_beta=0")
    for task, resps in responses(plain).items():
        for got, want in zip(responses(zero)[task], resps, strict=True):
            assert [float(r[0][0]) for r in got] == pytest.approx([float(r[0][0]) for r in want], abs=1e-4)
    assert zero["config"]["moebench"]["skipping"]["skipped"] == 0
    median = evaluate(env, "pruned_moe", f"pretrained={env.model},{env.calib},method=reap,ratio=0.25,skip=naee")
    skipping = median["config"]["moebench"]["skipping"]
    assert 0.25 <= skipping["slot_skip_rate"] <= 0.75, skipping  # median of calibration ratios, eval text differs
    assert skipping["pairs"] > 0 and median["config"]["moebench"]["skip"] == "naee"


@pytest.mark.slow
def test_bench_overhead_command_prints_the_wall_time_ratio_and_equal_scores():
    out = subprocess.run([str(BIN / "moebench"), "bench-overhead", "testbed-8e", "--tasks", "testbed_logic_quick",
                          "--limit", "8", "--reps", "1", "--device", "cpu"], capture_output=True, text=True,
                         timeout=600, env={**os.environ, **OFFLINE})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("pruned_moe method=none / hf wall time"))
    ratio = float(line.split(": ")[1].split("x")[0])
    assert ratio > 0 and "scores identical: yes" in line
    rows = [x.split()[0] for x in out.stdout.splitlines() if re.fullmatch(r"(hf|pruned_moe)\s+[\d.]+\s+[\d.]+", x)]
    assert rows == ["hf", "pruned_moe"]
