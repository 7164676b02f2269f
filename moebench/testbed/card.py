"""Evaluate a testbed checkpoint with lm-eval and write its model card (README.md + scores.json)."""

from __future__ import annotations

import json
from pathlib import Path

from moebench.testbed.recipes import get_recipe

SUBSET_LIMIT = 24  # items per task in the fixed subset the tests reproduce
MC_TASKS = ("testbed_arithmetic", "testbed_facts", "testbed_grammar", "testbed_code", "testbed_logic",
            "testbed_sequences")


def evaluate(folder: str | Path, limit: int | None = None, tasks: tuple[str, ...] = ("testbed",),
             batch_size: int = 32) -> dict[str, dict[str, float]]:
    """lm-eval scores of the checkpoint in `folder`: `{task or group: {metric,filter: value}}`."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from moebench.tasks import task_dir

    manager = TaskManager(include_path=task_dir(), include_defaults=False)
    result = simple_evaluate(model="hf", model_args=f"pretrained={folder}", tasks=list(tasks), device="cpu",
                             batch_size=batch_size, limit=limit, task_manager=manager, log_samples=False)
    return {task: {k: round(float(v), 4) for k, v in metrics.items()
                   if "," in k and "_stderr" not in k and isinstance(v, (int, float))}
            for task, metrics in result["results"].items()}


def _scores_table(scores: dict[str, dict[str, float]]) -> list[str]:
    rows = ["| task | metric | value |", "|---|---|---|"]
    for task in sorted(scores):
        for metric, value in sorted(scores[task].items()):
            rows.append(f"| {task} | {metric.split(',')[0]} | {value:.4f} |")
    return rows


def write_card(name: str, folder: str | Path, train_summary: str | None = None) -> Path:
    """Evaluate `folder` (full tasks, fixed subset, expert usage) and write README.md and scores.json."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moebench.testbed.usage import expert_usage, specialisation, usage_table

    folder = Path(folder)
    training = json.loads(Path(train_summary).read_text()) if train_summary else \
        json.loads((folder / "training.json").read_text()) if (folder / "training.json").is_file() else {}
    full, subset = evaluate(folder), evaluate(folder, limit=SUBSET_LIMIT)
    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    usage = expert_usage(model, AutoTokenizer.from_pretrained(folder))
    spec = specialisation(usage)
    params = sum(p.numel() for p in model.parameters())
    scores = {"full": full, "subset": {"limit": SUBSET_LIMIT, "scores": subset},
              "specialisation": {k: v for k, v in spec.items() if k != "specialists_per_layer"},
              "training": training, "parameters": params}
    (folder / "scores.json").write_text(json.dumps(scores, indent=1, sort_keys=True) + "\n")
    (folder / "README.md").write_text(_card_text(name, folder, scores, spec, usage_table(usage)))
    return folder / "README.md"


def _card_text(name: str, folder: Path, scores: dict, spec: dict, usage_rows: list[str]) -> str:
    recipe = get_recipe(name)
    mc = [scores["full"][t]["acc,none"] for t in MC_TASKS]
    training = scores["training"]
    size_mb = (folder / "model.safetensors").stat().st_size / 1e6
    specialists = "\n".join(
        f"- layer {layer}: " + (", ".join(f"e{e} {d} ({s:.0%})" for e, (d, s) in experts.items()) or "none")
        for layer, experts in spec["specialists_per_layer"].items())
    arch = ", ".join(f"{k}={v}" for k, v in sorted(recipe.arch.items()) if k != "output_router_logits")
    return f"""# {name}

{recipe.summary}. A tiny Mixture-of-Experts language model of the moebench embedded testbed,
trained from scratch on six synthetic domains so that expert pruning has visible, measurable
effects offline and on a laptop CPU. Not a general language model.

- Family: `{recipe.model_type}` (plain transformers classes, no custom code); {scores['parameters']:,} parameters.
- Weights: half precision (`model.safetensors`, {size_mb:.1f} MB); the config asks for float32 compute.
- Tokenizer: byte-level BPE trained on the training split, one token per digit ({folder.name}/tokenizer.json).

## Training recipe

`moebench zoo train {name}` rebuilds this checkpoint (seeded: data stream, initialisation and
tokenizer are deterministic; bit-exact equality also needs the same thread count and torch build).

- Architecture: {arch}
- Optimiser: AdamW (betas 0.9/0.95, weight decay {recipe.weight_decay}), peak lr {recipe.lr},
  {recipe.warmup} warm-up steps then cosine to 10%, gradient clipping 1.0, seed {recipe.seed}.
- Loss: next-token cross-entropy on every token plus the router load-balancing loss
  (coefficient {recipe.arch['router_aux_loss_coef']}).
- Batches: {recipe.batch_size} rows x {recipe.seq_len} tokens of whole training-split instances.
- Run: {training.get('steps', recipe.steps)} steps, {training.get('tokens', 0):,} tokens, \
{training.get('seconds', 0) / 60:.1f} min on {training.get('threads', '?')} CPU thread(s), \
final loss {training.get('final_loss', float('nan'))}.
  {training.get('note', '')}

## Data

Instances of six seeded synthetic domains (arithmetic, facts, grammar, code, logic, sequences;
see `moebench.testbed.domains`). Train, calibration and evaluation splits are disjoint at the
instance level (a stable hash of each prompt decides its split). The facts domain asks about a
fixed synthetic world of 60 people, whose facts appear in training in other prompts.

## Scores (unpruned, lm-eval, full tasks)

Average multiple-choice accuracy: **{sum(mc) / len(mc):.4f}** (chance 0.25).

{chr(10).join(_scores_table(scores['full']))}

Reproduce: `lm_eval --model hf --model_args pretrained=<this folder> \
--include_path <moebench.tasks.task_dir()> --tasks testbed`.
`scores.json` also holds the scores on a fixed subset (`--limit {SUBSET_LIMIT}`) that the test suite reproduces.

## Expert usage per domain

Share of each domain's top-k selections taken by its two most used experts, per layer
(200 evaluation instances per domain):

{chr(10).join(usage_rows)}

Specialisation: splitting each expert's traffic between domains weighted equally, the top domain
brings on average {spec['mean_top_domain_share']:.1%} of an expert's traffic (no specialisation:
{spec['uniform_share']:.1%}); {spec['specialist_fraction']:.1%} of experts get at least half their traffic \
from one domain:

{specialists}
"""
