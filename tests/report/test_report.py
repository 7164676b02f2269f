"""Reports, figures, published numbers and the leaderboard, from small tidy tables in the real schema."""

from __future__ import annotations

import filecmp
import glob
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml

from moebench.cli import main
from moebench.grid.results import RUN_COLUMNS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/report/ -> the repository
MC_TASKS = ["testbed_arithmetic", "testbed_facts", "testbed_logic"]
# (method, ratio, calib) -> accuracy drop per task, a plausible pattern: more pruning costs more,
# arithmetic calibration helps arithmetic.
GRID = [("none", 0.0, ""), *[(m, r, c) for m in ("reap", "grape") for r in (0.25, 0.5)
                             for c in ("testbed:mix", "testbed:arithmetic")]]
BASE_ACC = {"testbed_arithmetic": 0.80, "testbed_facts": 0.90, "testbed_logic": 0.70}


def _acc(method: str, ratio: float, calib: str, task: str) -> float:
    drop = ratio * (0.30 if method == "reap" else 0.22)
    if task == "testbed_arithmetic" and calib == "testbed:arithmetic":
        drop -= 0.05
    return round(BASE_ACC[task] - drop, 4)


def _plan(method: str, ratio: float, calib: str) -> dict:
    layers, kept = [0, 1, 2, 3], round(8 * (1 - ratio))
    # grape is non-uniform: the first layer keeps more
    counts = [min(8, kept + 1), kept, kept, max(2, kept - 1)] if method == "grape" else [kept] * 4
    keep = {str(layer): list(range(8 - n, 8)) if layer % 2 else list(range(n))
            for layer, n in zip(layers, counts, strict=True)}
    return {"method": method, "kind": "prune", "params": {}, "ratio": ratio, "calib": calib, "keep": keep,
            "extra": {"n_experts": 8}}


def make_results(root, study="toy", small=False) -> str:
    """A study folder with tables/{runs,scores,latency}.csv and cells/<id>/plan.json.

    Full: two models, the 9-cell GRID on one of them, one limited cell. Small: two cells (fast to draw).
    """
    folder = os.path.join(root, study)
    runs, scores, latency = [], [], []
    grid = [(("testbed-8e", *g, False)) for g in GRID] + [("testbed-16e", "none", 0.0, "", False),
                                                                ("testbed-16e", "reap", 0.5, "testbed:mix", False),
                                                                ("testbed-8e", "random", 0.5, "", True)]
    if small:
        grid = [grid[0], ("testbed-8e", "reap", 0.5, "testbed:mix", False)]
    for i, (model, method, ratio, calib, limited) in enumerate(grid):
        cell = f"c{i:02d}"
        expert = int(4_000_000 * (1 - ratio)) * (2 if model == "testbed-16e" else 1)
        row = dict.fromkeys(RUN_COLUMNS)
        row.update(cell=cell, study=study, model=model, method=method, params="{}", skip="none", ratio=ratio,
                   calib=calib, apply="physical", tasks="testbed_mc", limit=20 if limited else None, limited=limited,
                   expert_bytes=expert, other_bytes=500_000, run_peak_bytes=expert + 2_000_000,
                   memory_measure="cuda_allocated", decode_tokens_per_s=round(100.0 * (1 + 0.4 * ratio), 3),
                   decode_speedup=round(1 + 0.4 * ratio, 3), decode_speedup_lo=round(0.98 + 0.4 * ratio, 3),
                   decode_speedup_hi=round(1.02 + 0.4 * ratio, 3),
                   speed_pairing="self" if method == "none" else "interleaved", lm_eval_version="0.4.13",
                   task_versions="{}", seed=0)
        runs.append(row)
        for task in MC_TASKS:
            m = "random" if method == "random" else method
            value = _acc("reap" if m == "random" else m, ratio, calib, task) - (0.1 if m == "random" else 0)
            scores.append({"cell": cell, "task": task, "metric": "acc", "filter": "none", "value": value,
                           "stderr": 0.01, "n": 20 if limited else 200})
            scores.append({"cell": cell, "task": task, "metric": "acc_norm", "filter": "none", "value": value + 0.01,
                           "stderr": 0.01, "n": 20 if limited else 200})
        scores.append({"cell": cell, "task": "testbed_mc", "metric": "acc", "filter": "none", "value": 0.5,
                       "stderr": None, "n": None})  # group aggregate: no sample count, never averaged
        scores.append({"cell": cell, "task": "testbed_arithmetic_gen", "metric": "exact_match", "filter": "none",
                       "value": 0.3 - ratio / 4, "stderr": 0.02, "n": 100})
        if method != "none":
            os.makedirs(os.path.join(folder, "cells", cell), exist_ok=True)
            with open(os.path.join(folder, "cells", cell, "plan.json"), "w") as f:
                json.dump(_plan(method, ratio, calib), f)
        if model == "testbed-8e" and not limited:
            for prompt in (128, 512, 2048):
                latency.append({"cell": cell, "prompt_len": prompt, "batch": 1,
                                "ms_per_token": round((2 + prompt / 1024) * (1 - 0.3 * ratio), 4)})
    tables = os.path.join(folder, "tables")
    os.makedirs(tables, exist_ok=True)
    pd.DataFrame(runs, columns=RUN_COLUMNS).assign(mixed_versions=False).to_csv(f"{tables}/runs.csv", index=False)
    pd.DataFrame(scores).to_csv(f"{tables}/scores.csv", index=False)
    pd.DataFrame(latency).to_csv(f"{tables}/latency.csv", index=False)
    return folder


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Results and one generated report + leaderboard, shared by the checks below."""
    root = tmp_path_factory.mktemp("results")
    folder = make_results(str(root))
    out = tmp_path_factory.mktemp("reports")
    assert main(["report", folder, "--out", str(out)]) == 0
    assert main(["leaderboard", str(root), "--out", str(out)]) == 0
    return {"root": str(root), "folder": folder, "out": str(out), "report": os.path.join(str(out), "toy")}


def test_report_files_and_every_listed_figure_exist(built):
    report = built["report"]
    text = Path(os.path.join(report, "report.md")).read_text()
    assert os.path.getsize(os.path.join(report, "report.pdf")) > 10_000
    listed = re.findall(r"\]\((figures/[^)]+)\.png\)", text)
    expected = {"accuracy_vs_ratio", "recovery_vs_ratio", "memory_pareto", "speedup_vs_ratio", "latency_vs_input",
                "recovery_heatmap", "calibration_effect", "kept_experts_testbed-8e_grape"}
    assert {os.path.basename(p) for p in listed} == expected
    for stem in listed:
        for ext in ("png", "pdf"):
            assert os.path.getsize(os.path.join(report, f"{stem}.{ext}")) > 1000, (stem, ext)
    assert f"figures/{'accuracy_vs_ratio'}.pdf" in text
    assert "Skipped" not in text  # every figure had its data
    assert text.count("![") == len(expected)


def _type3_fonts(path: str) -> bool:
    with open(path, "rb") as f:
        return re.search(rb"/Subtype\s*/Type3", f.read()) is not None


def test_no_type3_fonts_in_any_pdf(built):
    pdfs = sorted(glob.glob(os.path.join(built["report"], "**", "*.pdf"), recursive=True))
    assert len(pdfs) == 9
    for path in pdfs:
        assert not _type3_fonts(path), path
        with open(path, "rb") as f:
            assert b"/FontFile2" in f.read(), path  # embedded TrueType
    with open(os.path.join(built["report"], "report.pdf"), "rb") as f:
        pages = len(re.findall(rb"/Type\s*/Page\b", f.read()))
    assert pages >= 8 + 3  # settings, main table, per-task text pages, then one page per figure
    if shutil.which("pdffonts"):
        listing = subprocess.run(["pdffonts", os.path.join(built["report"], "report.pdf")], capture_output=True,
                                 text=True, check=True).stdout
        assert "Type 3" not in listing and "TrueType" in listing


def test_latex_tables_use_booktabs(built):
    tables = sorted(glob.glob(os.path.join(built["report"], "tables", "*.tex")))
    assert [os.path.basename(t) for t in tables] == ["calibration_effect.tex", "main.tex", "per_task.tex"]
    for path in tables:
        text = Path(path).read_text()
        for rule in (r"\toprule", r"\midrule", r"\bottomrule"):
            assert rule in text, (path, rule)
        assert "|" not in text.split(r"\begin{tabular}")[1].split("}")[0]  # no vertical rules
    main_tex = Path(os.path.join(built["report"], "tables", "main.tex")).read_text()
    assert r"testbed:arithmetic" in main_tex and r"\_" not in "testbed-8e"


def test_recovery_equals_hand_computed(built):
    from moebench.report.tables import MetricSpec, load_studies, summary

    table = summary(load_studies(built["folder"])[0], MetricSpec())
    row = table[(table["model"] == "testbed-8e") & (table["method"] == "reap") & (table["ratio"] == 0.5)
                & (table["calib"] == "testbed:mix")].iloc[0]
    base = sum(BASE_ACC.values()) / 3  # group row testbed_mc and the gen task are left out
    pruned = sum(_acc("reap", 0.5, "testbed:mix", t) for t in MC_TASKS) / 3
    assert row["accuracy"] == pytest.approx(pruned)
    assert row["recovery"] == pytest.approx(100 * pruned / base)
    assert row["decode_speedup"] == pytest.approx(1.2)
    text = Path(os.path.join(built["report"], "report.md")).read_text()
    line = next(x for x in text.splitlines() if x.startswith("| testbed-8e | reap | testbed:mix | 0.50 |"))
    stderr = (3 * 0.01 ** 2) ** 0.5 / 3  # three tasks, each with stderr 0.01
    assert row["accuracy_stderr"] == pytest.approx(stderr)
    assert f"| {100 * pruned:.2f} \u00b1 {100 * stderr:.2f} | {100 * pruned / base:.1f} |" in line
    # acc_norm as the configured metric changes the average the same way for every task
    norm = summary(load_studies(built["folder"])[0], MetricSpec("acc_norm"))
    assert norm.loc[row.name, "accuracy"] == pytest.approx(pruned + 0.01)


def test_limited_runs_are_flagged_and_off_the_leaderboard(built):
    text = Path(os.path.join(built["report"], "report.md")).read_text()
    line = next(x for x in text.splitlines() if x.startswith("| testbed-8e | random |"))
    assert line.rstrip(" |").endswith("limited")
    assert "limited runs: 1 of 12" in text
    board = Path(os.path.join(built["out"], "leaderboard.md")).read_text()
    page = Path(os.path.join(built["out"], "leaderboard.html")).read_text()
    assert "random" not in board and "random" not in page
    assert "1 cells run with an lm-eval limit are left out" in board
    assert board.count("| toy | testbed-8e |") == 9 and "sortBy" in page and "<script>" in page


def test_regeneration_is_byte_identical(built, tmp_path):
    from moebench.report.leaderboard import write_leaderboard
    from moebench.report.tables import MetricSpec

    out = tmp_path / "again"
    assert main(["report", built["folder"], "--out", str(out)]) == 0
    # the leaderboard's cell links are relative to where it lies: made for the first one's folder here
    write_leaderboard(built["root"], str(out), MetricSpec(), links_from=built["out"])
    first = sorted(os.path.relpath(p, built["out"]) for p in glob.glob(f"{built['out']}/**/*", recursive=True)
                   if os.path.isfile(p))
    second = sorted(os.path.relpath(p, out) for p in glob.glob(f"{out}/**/*", recursive=True) if os.path.isfile(p))
    assert first == second and len(first) > 20
    _, mismatch, errors = filecmp.cmpfiles(built["out"], str(out), first, shallow=False)
    assert mismatch == [] and errors == []


def test_published_numbers_load_and_match_a_real_setup():
    from moebench.report.published import load_published, matches

    entries = load_published()
    papers = {e.short for e in entries}
    assert {"Lu et al. 2024", "Lasby et al. 2026 (REAP)", "Bai et al. 2025 (DiEP)",
            "Pei et al. 2026 (PreMoE v3)"} <= papers
    lu = [e for e in entries if e.short == "Lu et al. 2024" and e.method == "naee" and e.skip == "none"
          and e.quantity == "average" and e.tasks != ("gsm8k",)]
    assert sorted((e.model.split("/")[1], e.experts_kept, e.value) for e in lu) == [
        ("Mixtral-8x7B-Instruct-v0.1", 4, 63.88), ("Mixtral-8x7B-Instruct-v0.1", 6, 67.45),
        ("Mixtral-8x7B-v0.1", 4, 59.57), ("Mixtral-8x7B-v0.1", 6, 64.22)]
    assert all(e.source and e.table and e.venue for e in entries)
    r6 = next(e for e in lu if e.experts_kept == 6 and e.model.endswith("v0.1"))
    row = {"model": "/models/Mixtral-8x7B-v0.1", "method_id": "naee", "skip": "none", "ratio": 0.25,
           "calib": "c4", "params": "{}"}
    assert matches(r6, row) and not matches(r6, {**row, "calib": "math"}) and not matches(r6, {**row, "ratio": 0.5})


def test_measured_beside_published_and_figures_skipped_without_data(tmp_path):
    """A two-cell study relabelled as Mixtral with DiEP's four tasks, without latency table or plans."""
    folder = make_results(str(tmp_path / "results"), study="diep-mini", small=True)
    tables = os.path.join(folder, "tables")
    os.remove(os.path.join(tables, "latency.csv"))
    shutil.rmtree(os.path.join(folder, "cells"))
    runs = pd.read_csv(f"{tables}/runs.csv", keep_default_na=False, na_values=[""])
    runs.loc[runs["model"] == "testbed-8e", "model"] = "mistralai/Mixtral-8x7B-v0.1"
    runs.to_csv(f"{tables}/runs.csv", index=False)
    scores = pd.read_csv(f"{tables}/scores.csv", keep_default_na=False, na_values=[""])
    scores["task"] = scores["task"].replace({"testbed_arithmetic": "boolq", "testbed_facts": "mmlu",
                                             "testbed_logic": "openbookqa"})
    rte = scores[scores["task"] == "openbookqa"].assign(task="rte")
    pd.concat([scores, rte]).to_csv(f"{tables}/scores.csv", index=False)
    assert main(["report", folder, "--out", str(tmp_path / "reports")]) == 0
    text = (tmp_path / "reports" / "diep-mini" / "report.md").read_text()
    section = text.split("## Measured beside published")[1].split("## Figures")[0]
    measured = 100 * (0.80 + 0.90 + 0.70 + 0.70) / 4  # boolq, mmlu, openbookqa, rte of the unpruned cell
    assert (f"| Bai et al. 2025 (DiEP) | Table 1 | mistralai/Mixtral-8x7B-v0.1 | unpruned | 0.00 | - | average | "
            f"65.10 | {measured:.2f} | {measured - 65.1:.2f} | - |") in section
    assert "| peak_memory_mib | 89926.00 | 5.72 |" in section  # Lu et al.: 6 MB = 5.72 MiB
    assert "Lasby" not in section  # REAP's eight tasks were not run: no comparison
    assert "| Lu et al. 2024 | ACL 2024 (long papers) | Table 2 | mistralai/Mixtral-8x7B-v0.1 | unpruned |" in text
    assert "arXiv:2509.16105" in text  # sources cited in Appendix B
    tex = (tmp_path / "reports" / "diep-mini" / "tables" / "published.tex").read_text()
    assert r"\toprule" in tex and "Bai et al. 2025 (DiEP)" in tex
    # figures whose data are missing are left out, with the reason in the report's last list
    left_out = text.split("## Not in this report")[1].split("## Files")[0]
    assert "- Per-token latency vs input length: no latency table" in left_out
    assert "no plan.json in the cell folders" in left_out
    assert "- Calibration-domain effect: no method and ratio has cells with both a generic" in left_out
    assert "- Accuracy before and after recovery training: no recovered cells: no method entry" in left_out
    assert "(not drawn)" not in text and "## Calibration-domain effect" not in text
    assert not os.path.exists(tmp_path / "reports" / "diep-mini" / "figures" / "latency_vs_input.png")


def test_helpers_pareto_domains_latex_and_input_aware_maps():
    from moebench.report.domains import domain_tasks
    from moebench.report.figures import pareto_front
    from moebench.report.latex import escape
    from moebench.report.maps import _is_mapped, keep_matrix

    assert pareto_front([4.0, 5.0, 4.0, 6.0, 5.0], [70.0, 76.0, 65.0, 80.0, 74.0]) == [0, 1, 3]
    tasks = ["testbed_arithmetic", "testbed_arithmetic_gen", "testbed_facts", "hendrycks_math", "minerva_math500",
             "gsm8k", "humaneval"]
    assert domain_tasks("testbed:arithmetic", tasks) == ["testbed_arithmetic", "testbed_arithmetic_gen"]
    assert domain_tasks("math", tasks) == ["hendrycks_math", "minerva_math500"]
    assert domain_tasks("code", tasks, {"code": ["humaneval", "mbpp"]}) == ["humaneval"]
    assert escape("reap [c4] 50% a_b & $x") == r"reap [c4] 50\% a\_b \& \$x"
    plan = {"kind": "select", "keep": {"0": [0, 1], "1": [1, 2]},
            "extra": {"keep_frequency": {"0": [1.0, 0.5, 0.0, 0.25], "1": [0.0, 1.0, 1.0, 0.0]}}}
    layers, grid, freq = keep_matrix(plan, 4)
    assert _is_mapped(plan) and freq and layers == [0, 1] and grid[0].tolist() == [1.0, 0.5, 0.0, 0.25]
    uniform = {"kind": "prune", "keep": {"0": [0, 3], "1": [1, 2]}}
    assert not _is_mapped(uniform) and keep_matrix(uniform, 4)[1].tolist() == [[1, 0, 0, 1], [0, 1, 1, 0]]


# the published setups on real models (quickstart.yaml, the README's testbed study, is run by tests/test_quickstart.py)
STUDIES = sorted(p for p in glob.glob(os.path.join(REPO, "studies", "*.yaml")) if not p.endswith("quickstart.yaml"))


def _lm_eval_task_names() -> set[str]:
    """Task, group and tag names declared in lm-eval's shipped YAML files (a fast stand-in for its index)."""
    import lm_eval

    pattern = re.compile(r"^(?:task|group|tag):\s*[\"']?([A-Za-z0-9_.\-]+)", re.M)
    names = set()
    for path in glob.glob(os.path.join(os.path.dirname(lm_eval.__file__), "tasks", "**", "*.yaml"), recursive=True):
        with open(path, errors="ignore") as f:
            names.update(pattern.findall(f.read()))
    return names


def test_published_setup_studies_validate_except_model_downloads(monkeypatch):
    from moebench.grid import validate as grid_validate
    from moebench.grid.spec import parse_study

    assert len(STUDIES) >= 6
    monkeypatch.setattr(grid_validate, "_check_models", lambda spec: [])  # needs the models' config downloads
    monkeypatch.setattr(grid_validate, "_check_tasks", lambda spec: [])  # checked below, without the slow index
    known = _lm_eval_task_names()
    methods = set()
    for path in STUDIES:
        with open(path) as f:
            spec = yaml.safe_load(f)
        study = parse_study(spec)  # names, methods, parameters, ratios, calibration sources
        assert study.cells and all(c.model.count("/") == 1 for c in study.cells), path
        assert set(spec["tasks"]) <= known, (path, set(spec["tasks"]) - known)
        methods |= {(c.method, c.ratio) for c in study.cells}
    assert {("naee", 0.25), ("naee", 0.5), ("reap", 0.25), ("ean", 0.5), ("premoe", 0.5), ("naee", 0.0)} <= methods


def test_committed_leaderboard_regenerates_identically(tmp_path):
    if not glob.glob(os.path.join(REPO, "results", "*", "tables", "runs.csv")):
        pytest.skip("no committed results yet")
    from moebench.report.leaderboard import write_leaderboard
    from moebench.report.tables import MetricSpec

    # `moebench leaderboard` with its defaults, its cell links made from where the committed files lie
    write_leaderboard(os.path.join(REPO, "results"), str(tmp_path), MetricSpec(),
                      links_from=os.path.join(REPO, "reports"))
    for name in ("leaderboard.md", "leaderboard.html"):
        assert filecmp.cmp(tmp_path / name, os.path.join(REPO, "reports", name), shallow=False), name
    for committed in sorted(glob.glob(os.path.join(REPO, "reports", "*", "report.md"))):
        study = os.path.basename(os.path.dirname(committed))
        assert main(["report", os.path.join(REPO, "results", study), "--out", str(tmp_path)]) == 0
        for text_file in ["report.md", *glob.glob("tables/*.tex", root_dir=os.path.dirname(committed))]:
            assert filecmp.cmp(tmp_path / study / text_file, os.path.join(REPO, "reports", study, text_file),
                               shallow=False), (study, text_file)


def _summary_rows(values: dict) -> pd.DataFrame:
    """A main table (`tables.summary` columns that findings read): (method, ratio) -> accuracy."""
    return pd.DataFrame([{"method_id": m, "method": m, "ratio": r, "skip": "none", "calib": "testbed:mix",
                          "accuracy": a, "cell": f"{m}-{r}"} for (m, r), a in values.items()])


def test_f6_states_pruning_vs_merging_whichever_way_it_falls():
    from moebench.report.findings import f6

    table = _summary_rows({("reap", 0.25): 0.80, ("frequency", 0.25): 0.78, ("hc_smoe", 0.25): 0.70,
                           ("m_smoe", 0.25): 0.60, ("reap", 0.5): 0.50, ("hc_smoe", 0.5): 0.62})
    text = f6(table)
    assert text.startswith("F6 (pruning vs merging, same experts kept): ")
    assert ("at 25%: hc_smoe 70.0%, m_smoe 60.0%, sub_moe n/a, reap 80.0%, frequency 78.0%; best pruning reap 80.0% "
            "vs best "
            "merging hc_smoe 70.0% -> pruning ahead (+10.0 points") in text
    assert "best pruning reap 50.0% vs best merging hc_smoe 62.0% -> merging ahead (-12.0 points" in text
    absent = f6(_summary_rows({("reap", 0.25): 0.8}))
    assert absent.count("-> not measured") == 2 and "hc_smoe n/a" in absent


def test_published_merging_numbers_match_merge_cells():
    from moebench.report.published import load_published, matches

    entries = [e for e in load_published() if e.method in ("hc_smoe", "m_smoe")]
    assert {(e.method, e.ratio, e.calibration) for e in entries} == {
        (m, r, c) for m in ("hc_smoe", "m_smoe") for r in (0.25, 0.5) for c in ("code", "c4")}
    row = {"model": "mistralai/Mixtral-8x7B-Instruct-v0.1", "method_id": "hc_smoe", "skip": "none", "ratio": 0.5,
           "calib": "c4", "params": json.dumps({"linkage": "average"})}
    hc = [e for e in entries if matches(e, row)]
    assert [(e.method, e.value) for e in hc] == [("hc_smoe", 0.667)]
    one_row = {**row, "params": json.dumps({"router": "dominant"})}  # not the structure the paper measured
    assert not [e for e in entries if matches(e, one_row)]
