"""Training recipes of the testbed models and the CPU training loop.

A recipe is a transformers config (no custom modeling code) plus an optimisation schedule. The
loop packs whole instances of the training split into rows that start at an instance boundary,
trains with the family's router auxiliary (load-balancing) loss, and saves a checkpoint folder
that transformers and lm-eval load offline: fp16 weights, a config asking for float32 compute,
and the tokenizer.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from moebench.testbed.data import SEPARATOR, mixed_stream
from moebench.testbed.recipes import Recipe, get_recipe
from moebench.testbed.tokenizer import train_tokenizer


def build_model(recipe: Recipe, vocab_size: int, overrides: dict | None = None) -> torch.nn.Module:
    """A freshly initialised model for `recipe` (seeded by the recipe's seed)."""
    special = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}  # <|endoftext|> is token 0
    config = AutoConfig.for_model(recipe.model_type, vocab_size=vocab_size,
                                  **{**special, **recipe.arch, **(overrides or {})})
    torch.manual_seed(recipe.seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def batches(tok: PreTrainedTokenizerFast, batch_size: int, seq_len: int, seed: int):
    """Endless `[batch_size, seq_len]` int64 tensors of packed training-split instances."""
    source = mixed_stream("train", seed)
    backend = tok.backend_tokenizer
    carry: list[list[int]] = []
    while True:
        rows = []
        for _ in range(batch_size):
            row: list[int] = []
            while len(row) < seq_len:
                if not carry:
                    texts = [next(source).text + SEPARATOR for _ in range(512)]
                    carry = [e.ids for e in backend.encode_batch(texts)][::-1]
                row.extend(carry.pop())
            rows.append(row[:seq_len])
        yield torch.tensor(rows, dtype=torch.long)


def lr_at(step: int, recipe: Recipe, steps: int) -> float:
    """Linear warm-up then cosine decay to 10% of the peak rate."""
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    progress = (step - recipe.warmup) / max(1, steps - recipe.warmup)
    return recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(name: str, out: str | Path, steps: int | None = None, threads: int = 2,
          overrides: dict | None = None, log_every: int = 50, log=print) -> dict:
    """Train the recipe `name` for `steps` (default: the recipe's) and save it to `out`.

    Returns a summary: steps, tokens, seconds, final loss. `overrides` change the architecture
    (tests use it to train a micro model).
    """
    recipe = get_recipe(name)
    steps = recipe.steps if steps is None else steps
    torch.set_num_threads(threads)
    tok = train_tokenizer()
    model = build_model(recipe, len(tok), overrides)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.95))
    data = batches(tok, recipe.batch_size, recipe.seq_len, recipe.seed)
    start, loss_avg = time.time(), None
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, recipe, steps)
        ids = next(data)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_avg = loss.item() if loss_avg is None else 0.95 * loss_avg + 0.05 * loss.item()
        if log_every and (step + 1) % log_every == 0:
            elapsed = time.time() - start
            log(f"step {step + 1}/{steps} loss {loss_avg:.4f} "
                f"{(step + 1) * ids.numel() / elapsed:.0f} tok/s {elapsed / 60:.1f} min")
    summary = {"steps": steps, "tokens": steps * recipe.batch_size * recipe.seq_len,
               "seconds": round(time.time() - start, 1), "final_loss": round(float(loss_avg or 0), 4),
               "threads": threads}
    save_checkpoint(model, tok, out)
    (Path(out) / "training.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def save_checkpoint(model: torch.nn.Module, tok: PreTrainedTokenizerFast, out: str | Path) -> None:
    """Save fp16 weights, a float32-compute inference config and the tokenizer to `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.config.output_router_logits = False
    model.to(torch.float16).save_pretrained(out)
    model.to(torch.float32)
    config = AutoConfig.from_pretrained(out)
    config.dtype = "float32"  # stored in half precision, computed in float32 (CPU friendly)
    config.save_pretrained(out)
    tok.save_pretrained(out)
