"""The README's quickstart, run as a new user would: every command of its console blocks in order, each output
line it shows found in what the command prints (numbers may differ, accuracies by at most half a point), then
its Python snippet."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUMBER = re.compile(r"\d+(?:\.\d+)?")

pytestmark = pytest.mark.slow  # a real prune, lm-eval run, 7-cell grid and report


def quickstart() -> tuple[list[tuple[str, list[str]]], str]:
    """``([(command, shown output lines)], python snippet)`` of the README's Quickstart section."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        text = f.read()
    section = text.split("\n## Quickstart\n", 1)[1].split("\n## ", 1)[0]
    steps: list[tuple[str, list[str]]] = []
    for block in re.findall(r"```console\n(.*?)```", section, re.S):
        for line in block.splitlines():
            if line.startswith("$ "):
                steps.append((line[2:], []))
            else:
                steps[-1][1].append(line)
    (snippet,) = re.findall(r"```python\n(.*?)```", section, re.S)
    return steps, snippet


def pattern(shown: str) -> re.Pattern:
    """A shown line as a pattern: numbers may differ, ``...`` stands for anything, runs of spaces or dashes for any
    run of them (table columns widen with their values); a results row may end with its speed flag (``(under
    load)`` on a busy machine)."""
    parts = []
    for token in re.split(r"(\.\.\.|\d+(?:\.\d+)?|\s+|-{2,})", shown.strip()):
        if token == "...":
            parts.append(".*")
        elif NUMBER.fullmatch(token):
            parts.append(r"\d+(?:\.\d+)?")
        elif token.isspace():
            parts.append(r"\s+")
        elif re.fullmatch(r"-{2,}", token):
            parts.append("-+")
        else:
            parts.append(re.escape(token))
    return re.compile("".join(parts) + r"(?:\s+\((?:under load|unpaired)[^)]*\))?")  # a row's speed flag, if any


def accuracies(line: str) -> list[float]:
    """The accuracies a table row shows: ``0.956 ± 0.006`` (grid) or ``|0.4033|±`` (lm-eval)."""
    return [float(v) for v in re.findall(r"(\d\.\d+) ± \d|\|(\d\.\d+)\|±", line) for v in v if v]


def test_the_readme_quickstart_runs_as_shown(tmp_path):
    steps, snippet = quickstart()
    assert steps[0][0] == ". .venv/bin/activate"
    os.makedirs(tmp_path / "studies")
    shutil.copy(os.path.join(REPO, "studies", "quickstart.yaml"), tmp_path / "studies")
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
           "MOEBENCH_CACHE": str(tmp_path / "cache"),  # a first run: nothing cached yet
           "PYTHONUNBUFFERED": "1"}  # stdout and stderr in the order a terminal shows them
    for command, shown in steps[1:]:
        done = subprocess.run(command, shell=True, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=900)
        assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}"
        lines = [part.rstrip() for part in re.split(r"[\r\n]", done.stdout)]
        at = 0
        for want in (line for line in shown if line.strip() != "..."):
            hits = [i for i in range(at, len(lines)) if pattern(want).fullmatch(lines[i].strip())]
            assert hits, f"{command}: no line like {want!r} after line {at} of its output:\n" + "\n".join(lines[at:])
            at = hits[0]
            for got, expected in zip(accuracies(lines[at]), accuracies(want), strict=True):
                assert abs(got - expected) <= 0.005, (want, lines[at])
            at += 1
    assert os.path.isfile(tmp_path / "quickstart" / "reports" / "quickstart" / "figures" / "accuracy_vs_ratio.png")
    subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, env=env, check=True, timeout=300)
    assert os.path.getsize(tmp_path / "quickstart" / "accuracy_vs_weights.png") > 10_000
