"""Tiny local lm-eval tasks (one per request type) and readers of lm-eval's logged samples.

Shared by tests/eval/test_lm_eval.py and tests/method/test_select.py.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tiny_models import VOCAB

LOADER = '''"""Data of the tiny test tasks: <name>.jsonl next to this file."""
import json
from pathlib import Path

import datasets


def load(name, **_):
    lines = (Path(__file__).parent / f"{name}.jsonl").read_text().splitlines()
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([json.loads(x) for x in lines if x])})
'''
TASKS = {
    "tiny_mc": "output_type: multiple_choice\ndoc_to_text: query\ndoc_to_choice: choices\ndoc_to_target: label\n"
               "target_delimiter: ' '\nmetric_list:\n  - metric: acc\n    aggregation: mean\n"
               "    higher_is_better: true\n",
    "tiny_ppl": "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: text\n"
                "metric_list:\n  - metric: word_perplexity\n",
    "tiny_gen": "output_type: generate_until\ndoc_to_text: query\ndoc_to_target: answer\n"
                "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 3\n  do_sample: false\n"
                "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n",
}


def words(rng, n):
    """``n`` random words of the tiny vocabulary."""
    return " ".join(f"w{rng.randrange(VOCAB - 4)}" for _ in range(n))


def write_tasks(folder: Path) -> None:
    """Three local tasks (one per request type) with their data, loaded without any download."""
    folder.mkdir(parents=True)
    (folder / "tiny_tasks.py").write_text(LOADER)
    rng = random.Random(1)
    rows = {"tiny_mc": [{"query": words(rng, 8), "choices": [words(rng, 1) for _ in range(4)],
                         "label": rng.randrange(4)} for _ in range(16)],
            "tiny_ppl": [{"text": words(rng, 24)} for _ in range(4)],
            "tiny_gen": [{"query": words(rng, 6), "answer": words(rng, 1)} for _ in range(3)]}
    for name, body in TASKS.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[name]))
        (folder / f"{name}.yaml").write_text(
            f"task: {name}\ncustom_dataset: !function tiny_tasks.load\ndataset_kwargs:\n  name: {name}\n"
            f"test_split: test\n{body}metadata:\n  version: 1.0\n")


def responses(results: dict) -> dict:
    """Per task, every sample's raw model responses, in document order."""
    return {task: [s["resps"] for s in sorted(samples, key=lambda s: s["doc_id"])]
            for task, samples in results["samples"].items()}


def loglikelihoods(results: dict, task="tiny_mc") -> list[float]:
    return [float(r[0][0]) for sample in responses(results)[task] for r in sample]
