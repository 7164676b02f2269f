"""Model cards and provenance for pruned checkpoints.

A pruned checkpoint says what was done to it in two places:

- ``README.md``: a Hugging Face model card. YAML front matter as the Hub reads it (``base_model``,
  ``library_name``, ``tags``, ``pipeline_tag``) plus a ``moebench`` block (method, budget,
  calibration key, kept experts per MoE layer, moebench version), then a body in words.
- ``config.json`` under the key ``moebench`` (`record_provenance`): the same facts. Plain
  transformers keeps an unknown config key as an attribute and ignores it otherwise, so the
  checkpoint loads as before and ``config.moebench`` holds the provenance.

The data arrive as plain values (`provenance`); nothing here knows about methods or plans.
"""

from __future__ import annotations

import os

import yaml

import moebench
from moebench.util import atomic_write_text

CARD = "README.md"


def base_model_name(name_or_path: str) -> str:
    """What the card names as the base model: a hub id or registered name as given, a folder by its name."""
    path = os.path.expanduser(name_or_path)
    return os.path.basename(os.path.realpath(path)) if os.path.isdir(path) else name_or_path


def provenance(base_model: str, method: str, *, paper: str = "", params: dict | None = None,
               ratio: float | None = None, keep: int | None = None, calib: str | None = None,
               kept: dict[int, list[int]], experts_before: dict[int, int], expert_bytes: tuple[int, int],
               revision: str | None = None) -> dict:
    """The provenance record of a pruned checkpoint (JSON types only; layer keys as strings).

    ``kept``: MoE decoder-layer index -> kept expert ids; ``experts_before``: the same layers'
    counts before pruning; ``expert_bytes``: routed-expert bytes before and after.
    """
    layers = sorted(experts_before)
    return {"base_model": base_model_name(base_model), "base_model_revision": revision, "method": method,
            "paper": paper, "params": dict(params or {}), "ratio": ratio, "keep": keep, "calibration": calib,
            "experts_before": {str(i): int(experts_before[i]) for i in layers},
            "kept_experts": {str(i): sorted(int(e) for e in kept.get(i, range(experts_before[i]))) for i in layers},
            "expert_bytes": {"before": int(expert_bytes[0]), "after": int(expert_bytes[1])},
            "moebench_version": moebench.__version__}


def record_provenance(model, record: dict) -> None:
    """Put ``record`` in the model's config under ``moebench``; `save_pretrained` writes it to config.json."""
    model.config.moebench = record


def budget_text(record: dict) -> str:
    """The budget in words: ``ratio 0.5 (half of the routed experts removed)`` or ``6 experts kept per layer``."""
    if record.get("ratio") is not None:
        return f"ratio {record['ratio']:g} ({100 * record['ratio']:g}% of the routed experts removed)"
    if record.get("keep") is not None:
        return f"{record['keep']} experts kept per MoE layer"
    return "no budget"


def front_matter(record: dict) -> dict:
    """The card's YAML metadata: the Hub's keys, then moebench's own block."""
    counts = {int(i): len(ids) for i, ids in record["kept_experts"].items()}
    return {"base_model": record["base_model"], "library_name": "transformers", "pipeline_tag": "text-generation",
            "tags": ["moe", "expert-pruning", "moebench", f"moebench-{record['method']}",
                     *([f"moebench-recover-{record['recover']['kind']}"] if record.get("recover") else [])],
            "moebench": {"method": record["method"], "params": record["params"], "ratio": record["ratio"],
                         "keep": record["keep"], "calibration": record["calibration"],
                         "experts_per_layer": counts,
                         "kept_experts": {int(i): ids for i, ids in record["kept_experts"].items()},
                         "version": record["moebench_version"]}}


def disk_text(record: dict, disk: dict | None) -> list[str]:
    """The card's lines on the on-disk format and the checkpoint's bytes before and after (and MTP layers)."""
    if not disk:
        return []
    same = disk["format_before"] == disk["format_after"]
    how = ("the source's own format" if same else
           f"written dequantized on purpose (the source is {disk['format_before']})")
    lines = [f"Format on disk: {disk['format_after']} ({how}). Checkpoint bytes: "
             f"{disk['bytes_before'] / 1e6:.2f} MB -> {disk['bytes_after'] / 1e6:.2f} MB.", ""]
    mtp = record.get("mtp_kept_experts")
    if mtp:
        lines += [f"Multi-token-prediction layer(s) {', '.join(mtp)}: pruned to the last trunk MoE layer's kept ids "
                  "(its routing is not observed: transformers does not run the MTP layer), so every MoE layer in "
                  "the file has one expert count.", ""]
    return lines


def recover_text(record: dict) -> list[str]:
    """The card's lines on a recovery stage after pruning (`moebench recover`), if there was one."""
    done = record.get("recover")
    if not done:
        return []
    trained = {"lora": "LoRA adapters on the attention projections and the experts, merged into the weights",
               "router_kd": "the routers alone, distilled from the unpruned model",
               "full": "every weight"}.get(done["kind"], done["kind"])
    return [f"Recovered after pruning: {trained}, trained {done['steps']} steps on "
            f"`{done['data']}` (learning rate {done['lr']:g}; loss {done['loss_first_tenth']:.4f} -> "
            f"{done['loss_last_tenth']:.4f}, the mean of the first and last tenth of the steps). The sizes are the "
            "pruned model's.", ""]


def card_text(record: dict, disk: dict | None = None) -> str:
    """The whole model card: front matter and a body that says what was done; ``disk``: `disk_summary`'s facts."""
    meta = yaml.safe_dump(front_matter(record), sort_keys=False, default_flow_style=None, width=100)
    before, after = record["expert_bytes"]["before"], record["expert_bytes"]["after"]
    counts = {len(ids) for ids in record["kept_experts"].values()}
    calib = (f"chosen from calibration statistics `{record['calibration']}`" if record["calibration"]
             else "chosen without calibration data")
    rows = [f"| {i} | {record['experts_before'][i]} | {len(ids)} | {', '.join(map(str, ids))} |"
            for i, ids in record["kept_experts"].items()]
    loading = ("Plain transformers loads it: `AutoModelForCausalLM.from_pretrained(folder)`." if len(counts) == 1 else
               "Layers keep different numbers of experts, which plain transformers cannot build from one config: "
               "load it with `moebench.moe.checkpoint.load_model(folder)` or any moebench command.")
    layout = record.get("layout")  # merged experts behind every router row (router=all)
    if layout == "compact":
        loading = ("Every router row is kept and routes to its group's merged expert, held once (the member -> "
                   "merged-expert maps are `moebench_expert_map` in config.json): plain transformers and vLLM cannot "
                   "load it; load it with `moebench.moe.checkpoint.load_model(folder)` or any moebench command.")
    elif layout == "duplicated":
        loading = ("Every router row is kept and every expert slot holds a copy of its group's merged expert (the "
                   "routed-expert bytes above count each merged expert once; the files hold the copies): plain "
                   "transformers loads it, `AutoModelForCausalLM.from_pretrained(folder)`, and so does vLLM.")
    if record.get("novice_experts"):  # MoNE: constant experts behind every router row
        loading = ("Every router row is kept; the replaced experts answer with constant vectors times their gate "
                   "(`novices.safetensors`, listed under `moebench_novices` in config.json): plain transformers and "
                   "vLLM cannot apply them; load it with `moebench.moe.checkpoint.load_model(folder)` or any "
                   "moebench command.")
    paper = f" ({record['paper']})" if record.get("paper") else ""
    params = ", ".join(f"{k}={v}" for k, v in sorted(record["params"].items()))
    params = f"parameters {params}" if params else "default parameters"
    return "\n".join([
        "---", meta.rstrip(), "---", "",
        f"# {record['base_model']}, pruned with {record['method']}", "",
        f"This checkpoint is `{record['base_model']}` with routed experts removed by moebench "
        f"{record['moebench_version']}: method `{record['method']}`{paper}, {params}, "
        f"{budget_text(record)}. The experts to keep were {calib}. Shared experts, attention and "
        "every other weight are unchanged.", "",
        f"Routed-expert bytes: {before / 1e6:.2f} MB -> {after / 1e6:.2f} MB.", "", *recover_text(record),
        *disk_text(record, disk),
        "| MoE layer | experts before | kept | kept expert ids |", "|---|---|---|---|", *rows, "",
        loading + " The same facts are in `config.json` under `moebench` and, with the full plan, in "
        "`plan.json`.", "",
        "Accuracy was not measured when pruning; evaluate it with lm-eval, e.g. "
        "`lm_eval --model hf --model_args pretrained=<this folder> --tasks ...`.", ""])


def write_card(folder: str, record: dict, disk: dict | None = None) -> str:
    """Write ``README.md`` (the model card) into the checkpoint ``folder``; returns its path."""
    path = os.path.join(folder, CARD)
    atomic_write_text(path, card_text(record, disk))
    return path
