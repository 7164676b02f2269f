"""`moebench bench-scale`: what sequential calibration and streaming prune cost on a model with real layer shapes.

1. Build (or take) a random model with real per-layer shapes, saved as safetensors shards one
   decoder layer at a time (`build_random_checkpoint`: never in memory whole), with a word-level
   tokenizer and a calibration text of random words.
2. Run ``moebench prune MODEL --method M --ratio R --calib file:... --sequential --out DIR`` as a
   child process and read its peak resident memory (``wait4``'s ``ru_maxrss``) and wall time.
3. Time one MoE layer in this process on the same calibration batches: a plain forward (the
   model's own experts kernel), moebench's kernel without observers, the cheap statistics
   (routing + norms + logits) and the ``outputs`` group; and the time to read the layer.
4. Extrapolate from the measured per-layer figures to Mixtral-8x7B, Qwen3-30B-A3B and DeepSeek-V3
   (their configs built on the meta device, so their layer sizes and active parameters are
   counted, not typed in): memory = process baseline + the measured multiple of the largest
   layer + the calibration hidden states; time = three reads of the weights (fingerprint,
   calibration, writing) + per-layer compute scaled by tokens x active parameters per token.
"""

from __future__ import annotations

import os
import random
import shutil
import statistics as pystats
import subprocess
import sys
import tempfile
import time

import torch

GiB = 1 << 30

# The real models' configs (public config.json values), for the extrapolation and the default shape.
REAL_MODELS = {
    "Mixtral-8x7B": ("mixtral", {
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32000,
        "tie_word_embeddings": False}),
    "Qwen3-30B-A3B": ("qwen3_moe", {
        "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48,
        "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
        "num_experts_per_tok": 8, "vocab_size": 151936, "norm_topk_prob": True, "tie_word_embeddings": False}),
    "DeepSeek-V3": ("deepseek_v3", {
        "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
        "first_k_dense_replace": 3, "num_attention_heads": 128, "num_key_value_heads": 128,
        "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4,
        "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
        "v_head_dim": 128, "vocab_size": 129280, "tie_word_embeddings": False}),
}


def real_config(name: str, **overrides):
    """The transformers config of one of `REAL_MODELS` (bfloat16), with ``overrides``."""
    from transformers import AutoConfig

    model_type, values = REAL_MODELS[name]
    return AutoConfig.for_model(model_type, **{**values, "dtype": "bfloat16", **overrides})


def layer_figures(config) -> dict:
    """Per-decoder-layer bytes and active parameters per token of a config (counted on the meta device)."""
    from transformers import AutoModelForCausalLM

    from moebench.moe.layered import decoder_layers
    from moebench.moe.view import MoEView

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    view = MoEView(model)
    moe = {layer.index: layer for layer in view.layers}
    sizes, active = [], []
    for i, layer in enumerate(decoder_layers(model)):
        total = sum(p.numel() for p in layer.parameters())
        sizes.append(total * 2)
        if i in moe:
            experts = sum(t.numel() for t in moe[i].expert_tensors().values())
            active.append(total - experts + experts * moe[i].top_k // moe[i].num_experts)
        else:
            active.append(total)
    other = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in decoder_layers(model).parameters())
    return {"layers": len(sizes), "largest_layer": max(sizes), "layer_bytes": sum(sizes), "other_bytes": other * 2,
            "active_per_token": sum(active), "active_largest": max(active), "hidden": config.hidden_size,
            "total_bytes": sum(sizes) + other * 2}


def build_random_checkpoint(folder: str, config, seed: int = 0, progress: bool = True) -> dict:
    """Write a random model of ``config`` to ``folder`` one decoder layer at a time (safetensors shards,
    the checkpoint's own key names, an index), plus a word-level tokenizer of its vocabulary."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion

    from moebench.moe.layered import decoder_layers
    from moebench.moe.streaming import ShardWriter

    os.makedirs(folder, exist_ok=True)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    layers = decoder_layers(model)
    parts = [(f"model.layers.{i}", layer) for i, layer in enumerate(layers)]
    parts += [(name, module) for name, module in model.named_children() if name != "model"]
    parts += [(f"model.{name}", module) for name, module in model.model.named_children() if name != "layers"]
    parts = [(name, module) for name, module in parts if any(True for _ in module.parameters())]
    generator = torch.Generator().manual_seed(seed)
    shards = ShardWriter(folder, len(parts))
    for n, (prefix, module) in enumerate(parts):
        began = time.perf_counter()
        module.to_empty(device="cpu")
        with torch.no_grad():
            for name, p in module.named_parameters():
                if p.dim() == 1:  # norms' scales 1, biases 0
                    p.fill_(1.0 if "norm" in name else 0.0)
                else:
                    p.normal_(0.0, 0.02, generator=generator)
        tensors = revert_weight_conversion(model, module.state_dict(prefix=prefix + "."))
        shards.write(tensors, n)
        module.to("meta")
        del tensors
        if progress:
            print(f"  wrote {prefix} ({time.perf_counter() - began:.1f}s)", file=sys.stderr, flush=True)
    written = shards.finish()
    config.save_pretrained(folder)
    _word_tokenizer(config.vocab_size).save_pretrained(folder)
    return {"bytes": written["bytes"]}


def _word_tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(vocab - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def write_calibration_text(path: str, vocab: int, words: int, seed: int = 0) -> None:
    """Random words of the word-level vocabulary, 200 per document (documents separated by blank lines)."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for start in range(0, words, 200):
            f.write(" ".join(f"w{rng.randrange(vocab - 4)}" for _ in range(min(200, words - start))) + "\n\n")


# Run a module as __main__ and report the process's own peak RSS (VmHWM) at exit. ``ru_maxrss`` of a child
# is not usable: Linux folds the parent's high-water mark into it at exec.
PEAK_MARK = "moebench-peak-rss-bytes"
GPU_PEAK_MARK = "moebench-peak-cuda-bytes"
LAUNCHER = """
import atexit, runpy, sys

def peak():
    with open('/proc/self/status') as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith('VmHWM:'))
    print('{mark}', kb * 1024, file=sys.stderr, flush=True)
    torch = sys.modules.get('torch')
    if torch is not None and torch.cuda.is_initialized():
        total = sum(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count()))
        print('{gpu_mark}', total, file=sys.stderr, flush=True)

atexit.register(peak)
module, sys.argv = sys.argv[1], sys.argv[1:]
if module == '-':
    import moebench.cli.prune, transformers, torch  # what a moebench command imports, and nothing else
else:
    runpy.run_module(module, run_name='__main__')
""".replace("{mark}", PEAK_MARK).replace("{gpu_mark}", GPU_PEAK_MARK)


def measure_child(module: str, args: list[str]) -> dict:
    """Run ``python -m module args`` in a child: its wall time, peak RSS and output (an error if it fails)."""
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", LAUNCHER, module, *args], capture_output=True, text=True)
    seconds = time.perf_counter() - began
    text = done.stdout + done.stderr
    peaks = [int(line.split()[1]) for line in done.stderr.splitlines() if line.startswith(PEAK_MARK)]
    gpu = [int(line.split()[1]) for line in done.stderr.splitlines() if line.startswith(GPU_PEAK_MARK)]
    if done.returncode != 0 or not peaks:
        raise RuntimeError(f"{module} {' '.join(args)} failed ({done.returncode}):\n{text[-3000:]}")
    return {"seconds": seconds, "peak_rss": peaks[-1], "peak_cuda": gpu[-1] if gpu else None, "log": text}


def run_prune(model: str, out: str, calib: str, samples: int, seq_len: int, method: str, ratio: float,
              stats_dir: str, device: str = "cpu") -> dict:
    """``moebench prune ... --sequential`` in a child process: its wall time, peak RSS (and peak bytes torch
    allocated on GPUs, when it used one) and output."""
    return measure_child("moebench.cli", ["prune", model, "--method", method, "--ratio", str(ratio), "--calib", calib,
                                          "--samples", str(samples), "--seq-len", str(seq_len), "--sequential",
                                          "--out", out, "--stats-dir", stats_dir, "--device", device])


def baseline_rss() -> int:
    """Peak RSS of a child that imports what `moebench prune` imports and does nothing else."""
    return measure_child("-", [])["peak_rss"]


def time_layer(folder: str, samples: int, seq_len: int, repeats: int = 2, subsample: int = 2048,
               device: str = "cpu") -> dict:
    """Seconds for one MoE layer on ``samples x seq_len`` tokens: read, plain forward (the model's own
    kernel), moebench's kernel, cheap statistics, the outputs group (medians over ``repeats``)."""
    from moebench.calib.cache import CHEAP_GROUPS
    from moebench.calib.sequential import run_layer
    from moebench.calib.stats import CollectSettings, _LayerAccumulator
    from moebench.calib.stats import subsample as pick
    from moebench.moe.layered import LayeredCheckpoint
    from moebench.moe.view import MoEView

    checkpoint = LayeredCheckpoint(folder, device=device)
    tokens = torch.randint(4, checkpoint.model.config.vocab_size, (samples, seq_len),
                           generator=torch.Generator().manual_seed(0))
    settings = CollectSettings(batch_size=4, subsample_tokens=subsample)
    hidden, kwargs = checkpoint.layer_inputs(tokens, settings.batch_size)
    layer = MoEView(checkpoint.model).layers[0]
    began = time.perf_counter()
    module = checkpoint.materialise(layer.index)
    read = time.perf_counter() - began
    chosen = pick(tokens.numel(), subsample, 0)

    def once(groups, kernel=True):
        acc = _LayerAccumulator(layer, set(groups), settings, chosen, seq_len) if groups is not None else None
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        run_layer(checkpoint, module, list(hidden), kwargs[layer.index], acc, kernel=kernel)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    figures = {}
    for label, groups, kernel in (("plain", None, False), ("kernel", None, True), ("cheap", CHEAP_GROUPS, True),
                                  ("outputs", ("outputs",), True)):
        once(groups, kernel)  # warm-up
        figures[label] = pystats.median(once(groups, kernel) for _ in range(repeats))
    checkpoint.release(module)
    figures.update(read=read, tokens=tokens.numel(), subsample=min(subsample, tokens.numel()),
                   subsample_default=subsample,
                   kernel_default=str(getattr(checkpoint.model.config, "_experts_implementation", None)))
    return figures


def bench_scale(folder: str | None, layers: int, experts: int, samples: int, seq_len: int, method: str,
                ratio: float, keep: bool = False, work: str | None = None, device: str = "cpu") -> dict:
    """The whole benchmark; returns every measured and extrapolated figure (`format_report` prints them)."""
    work = work or tempfile.mkdtemp(prefix="moebench-scale-")
    os.makedirs(work, exist_ok=True)
    built = folder is None
    try:
        if built:
            folder = os.path.join(work, "model")
            config = real_config("Qwen3-30B-A3B", num_hidden_layers=layers, num_experts=experts,
                                 max_position_embeddings=max(4096, seq_len))
            print(f"building a random Qwen3-MoE-shaped model: {layers} layers x {experts} experts in {folder}",
                  file=sys.stderr, flush=True)
            build_random_checkpoint(folder, config)
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(folder)
        shape = layer_figures(config)
        disk = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))
        text = os.path.join(work, "calibration.txt")
        write_calibration_text(text, config.vocab_size, samples * seq_len * 2)
        pruned = run_prune(folder, os.path.join(work, "pruned"), f"file:{text}", samples, seq_len, method, ratio,
                           os.path.join(work, "stats"), device)
        layer = time_layer(folder, samples, seq_len, device=device)
        base = baseline_rss()
        return {"model": folder, "disk_bytes": disk, "shape": shape, "prune": pruned, "layer": layer,
                "baseline_rss": base, "samples": samples, "seq_len": seq_len, "method": method, "ratio": ratio,
                "device": device,
                "extrapolation": extrapolate(shape, pruned, layer, base, samples * seq_len)}
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


CALIBRATION_TOKENS = 128 * 2048  # the default calibration set (128 sequences of 2048 tokens)


def extrapolate(shape: dict, pruned: dict, layer: dict, base: int, tokens: int) -> dict:
    """Memory and time of ``prune --sequential`` on the real models from the measured per-layer figures."""
    hidden_store = tokens * shape["hidden"] * 2  # every batch's hidden states (replaced in place), bfloat16
    multiple = max(0.0, (pruned["peak_rss"] - base - hidden_store) / shape["largest_layer"])
    per_param_token = layer["cheap"] / (layer["tokens"] * shape["active_largest"])
    read_rate = shape["largest_layer"] / layer["read"]  # bytes per second
    out = {"multiple": multiple, "per_param_token": per_param_token, "read_rate": read_rate, "models": {}}
    for name in REAL_MODELS:
        real = layer_figures(real_config(name))
        store = CALIBRATION_TOKENS * real["hidden"] * 2
        memory = base + multiple * real["largest_layer"] + store
        compute = per_param_token * CALIBRATION_TOKENS * real["active_per_token"]
        reading = 3 * real["total_bytes"] / read_rate
        out["models"][name] = {"total_bytes": real["total_bytes"], "largest_layer": real["largest_layer"],
                               "hidden_store": store, "memory": memory, "compute_s": compute, "read_s": reading,
                               "active_per_token": real["active_per_token"], "layers": real["layers"]}
    return out


def outputs_at_default(lay: dict) -> float:
    """The outputs group's cost over a plain forward at the default calibration: the forward scales with the
    tokens, the extra (every expert on the subsample) with the subsample size."""
    extra = (lay["outputs"] - lay["plain"]) * lay["subsample_default"] / lay["subsample"]
    return 1 + extra / (lay["plain"] * CALIBRATION_TOKENS / lay["tokens"])


def format_report(r: dict) -> str:
    """The benchmark's figures as text, with the targets and the arithmetic of the extrapolation."""
    shape, p, lay, ext = r["shape"], r["prune"], r["layer"], r["extrapolation"]
    peak, largest, size = p["peak_rss"], shape["largest_layer"], r["disk_bytes"]
    limit = 2.5 * largest + 1.5 * GiB
    lines = [
        f"model: {shape['layers']} decoder layers, {size / GiB:.2f} GiB on disk, largest layer {largest / GiB:.3f} GiB",
        f"moebench prune --sequential --method {r['method']} --ratio {r['ratio']} ({r['samples']} x {r['seq_len']} "
        f"tokens): {p['seconds']:.1f} s",
        f"  peak RSS {peak / GiB:.2f} GiB = {peak / largest:.2f}x the largest layer, {100 * peak / size:.1f}% of the "
        f"model (process baseline after imports {r['baseline_rss'] / GiB:.2f} GiB)",
        f"  target <= 2.5 x largest layer + 1.5 GiB = {limit / GiB:.2f} GiB: {'met' if peak <= limit else 'NOT met'}; "
        f"target <= 50% of the model: {'met' if peak <= 0.5 * size else 'NOT met'}",
        *([f"  on {r.get('device')}: peak GPU memory (bytes torch allocated) {p['peak_cuda'] / GiB:.2f} GiB = "
           f"{p['peak_cuda'] / largest:.2f}x the largest layer"] if p.get("peak_cuda") else []),
        f"one MoE layer, {lay['tokens']} tokens (read {lay['read']:.2f} s = {largest / lay['read'] / GiB:.2f} GiB/s):",
        f"  plain forward (model's kernel: {lay['kernel_default']}) {lay['plain']:.2f} s; moebench kernel "
        f"{lay['kernel']:.2f} s ({lay['kernel'] / lay['plain']:.2f}x)",
        f"  cheap statistics (routing + norms + logits) {lay['cheap']:.2f} s = {lay['cheap'] / lay['plain']:.2f}x a "
        f"plain forward (target <= 1.1x)",
        f"  outputs ({lay['subsample']} tokens x every expert) {lay['outputs']:.2f} s = "
        f"{lay['outputs'] / lay['plain']:.2f}x at these {lay['tokens']} tokens; at the default calibration "
        f"({CALIBRATION_TOKENS} tokens, a {lay['subsample_default']}-token subsample): "
        f"{outputs_at_default(lay):.2f}x (target <= 2x; the extra cost scales with the subsample, the forward with "
        "the tokens)",
        f"  whole prune vs a plain forward of every layer ({shape['layers']} x {lay['plain']:.2f} s): "
        f"{p['seconds'] / (shape['layers'] * lay['plain']):.1f}x",
        "",
        f"extrapolation (default calibration {CALIBRATION_TOKENS} tokens, bfloat16, 2-core CPU figures):",
        f"  memory = baseline {r['baseline_rss'] / GiB:.2f} GiB + {ext['multiple']:.2f} x largest layer (measured: "
        "(peak - baseline - hidden states) / largest layer) + hidden states (tokens x hidden x 2 bytes)",
        f"  time = 3 reads of the weights at {ext['read_rate'] / GiB:.2f} GiB/s + tokens x active parameters x "
        f"{ext['per_param_token'] * 1e12:.3f} s per 10^12 (cheap statistics, measured)",
    ]
    for name, m in ext["models"].items():
        lines.append(f"  {name}: {m['total_bytes'] / GiB:.0f} GiB, {m['layers']} layers, largest layer "
                     f"{m['largest_layer'] / GiB:.2f} GiB, hidden states {m['hidden_store'] / GiB:.2f} GiB -> peak "
                     f"~{m['memory'] / GiB:.1f} GiB; time ~{(m['compute_s'] + m['read_s']) / 3600:.1f} h "
                     f"({m['compute_s'] / 3600:.1f} h compute for {m['active_per_token'] / 1e9:.1f}B active "
                     f"parameters per token + {m['read_s'] / 3600:.2f} h reading)")
    return "\n".join(lines)
