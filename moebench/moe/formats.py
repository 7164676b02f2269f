"""Published checkpoint formats, and a pruned checkpoint written in its source's format.

Large MoEs are published quantized: DeepSeek-V3/R1 and Kimi-K2 store every linear layer as FP8
(float8_e4m3fn ``weight`` plus a float32 ``weight_scale_inv`` per 128 x 128 block), GPT-OSS
stores its routed experts as MXFP4 (``*_blocks`` with two FP4 codes a byte, ``*_scales`` with one
exponent per 32 values). transformers dequantizes both on a CPU (and on GPUs without FP8), and
``save_pretrained`` then writes bf16: a "pruned" checkpoint would be larger than its source. Some
also carry multi-token-prediction (MTP) layers at ``model.layers.<num_hidden_layers>...``, which
transformers ignores at load and ``save_pretrained`` drops.

`save_sliced` writes the pruned checkpoint from the source's own tensors instead of the model in
memory: every tensor of the source is copied as stored, except the routed experts' (per-expert
keys of dropped experts are left out and the kept ones renumbered; fused ``[E, ...]`` tensors,
their blocks, scales and biases are sliced along the expert dimension) and the routers' per-expert
rows (weight, bias, score-correction bias). So an FP8 checkpoint stays FP8 with its block scales,
MXFP4 stays MXFP4, bf16 stays bf16; ``quantization_config`` and every other config key are kept,
the expert count updated. MTP layers are pruned with the kept ids of the last trunk MoE layer, so
that one expert count holds for every MoE layer in the file (serving engines build all layers,
MTP included, from one count). With ``save_dtype`` the quantized tensors are dequantized on
purpose by transformers' own FP8 / MXFP4 code and every float tensor is cast.

Only the tensors kept are read (safetensors slices), one at a time: the model is never in memory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from contextlib import ExitStack

import torch

from moebench.moe.files import LAYER_KEY, ShardWriter, open_shard, trim_heap
from moebench.moe.files import weight_map as read_weight_map
from moebench.moe.view import MoEError, MoEView

PER_EXPERT = re.compile(r"\.experts\.(\d+)\.")
QUANTIZED_METHODS = ("fp8", "mxfp4")
SAVE_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
               "fp32": torch.float32, "float32": torch.float32}


def parse_save_dtype(value: str | None) -> torch.dtype | None:
    """``--save-dtype`` / ``save_dtype=``: None (the source's format) or a torch float dtype."""
    if value in (None, "", "source", "auto"):
        return None
    if value not in SAVE_DTYPES:
        raise ValueError(f"save dtype {value!r} is not one of {', '.join(sorted(SAVE_DTYPES))} (or source, the "
                         "default: the checkpoint's own format)")
    return SAVE_DTYPES[value]


def raw_config(folder: str) -> dict:
    """config.json of a checkpoint folder as stored (every key, ``quantization_config`` included)."""
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        return json.load(f)


def as_dict(config) -> dict:
    """A config object or config.json dict as a dict."""
    return config if isinstance(config, dict) else config.to_dict()


def _text(config: dict) -> dict:
    return config.get("text_config") or config


def quantization(config) -> dict | None:
    """The ``quantization_config`` of a config (object or config.json dict) as a dict, or None."""
    if isinstance(config, dict):
        q = config.get("quantization_config") or _text(config).get("quantization_config")
    else:
        q = getattr(config, "quantization_config", None)
        if q is None and hasattr(config, "get_text_config"):
            q = getattr(config.get_text_config(decoder=True), "quantization_config", None)
    if q is None:
        return None
    return dict(q) if isinstance(q, dict) else q.to_dict()


def quant_method(config) -> str | None:
    """``fp8``, ``mxfp4``, another transformers quant_method, or None for a checkpoint stored unquantized."""
    q = quantization(config)
    if not q:
        return None
    method = q.get("quant_method")
    return str(getattr(method, "value", method))


def mtp_indices(config, folder: str) -> list[int]:
    """Decoder-layer indices of the multi-token-prediction layers a checkpoint folder holds: those its config
    declares (`mtp_layers`) whose tensors are in the files (transformers' DeepSeek-V3 config declares one by
    default, and a checkpoint it saved holds none)."""
    declared = mtp_layers(config)
    if not declared:
        return []
    n_layers = int(_text(as_dict(config)).get("num_hidden_layers"))
    present = {_layer_of(key) for key in read_weight_map(folder)}
    return [i for i in range(n_layers, n_layers + declared) if i in present]


def mtp_layers(config) -> int:
    """Multi-token-prediction layers the checkpoint's config declares (``num_nextn_predict_layers``; 0 when none)."""
    value = (_text(config).get("num_nextn_predict_layers") if isinstance(config, dict)
             else getattr(config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config,
                          "num_nextn_predict_layers", 0))
    return int(value or 0)


SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16",
                      "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "U8": "uint8", "I8": "int8"}


def stored_dtype(folder: str) -> str | None:
    """The dtype most of a checkpoint's floating-point bytes are stored in, read from the safetensors headers
    (the config's ``dtype`` may differ: a checkpoint saved in float16 whose config says float32 loads as float32)."""

    try:
        weight_map = read_weight_map(folder)
    except (OSError, ValueError):
        return None
    sizes: dict[str, int] = {}
    by_file: dict[str, list[str]] = {}
    for key, file in weight_map.items():
        by_file.setdefault(file, []).append(key)
    for file, keys in by_file.items():
        with open_shard(file) as handle:
            for key in keys:
                view = handle.get_slice(key)
                dtype = view.get_dtype()
                if dtype.startswith(("F", "BF")):
                    n = 1
                    for d in view.get_shape():
                        n *= d
                    sizes[dtype] = sizes.get(dtype, 0) + n
    if not sizes:
        return None
    top = max(sizes, key=sizes.get)
    return SAFETENSORS_DTYPES.get(top, top.lower())


def format_name(config, folder: str | None = None) -> str:
    """The on-disk format in words, e.g. ``FP8 e4m3, 128x128 blocks`` or ``bfloat16``; ``folder``: read the
    stored dtype of an unquantized checkpoint from its files (else the config's ``dtype`` says)."""
    config = as_dict(config)
    declared = _text(config).get("dtype") or _text(config).get("torch_dtype") or "float32"
    q = quantization(config)
    if q:
        method = quant_method(config)
        if method == "fp8":
            block = q.get("weight_block_size")
            return f"FP8 {q.get('fmt', 'e4m3')}" + (f", {block[0]}x{block[1]} blocks" if block else ", per tensor")
        if method == "mxfp4":
            return f"MXFP4 experts (32-value blocks), other weights {declared}"
        return str(method)
    return (stored_dtype(folder) if folder else None) or str(declared)


def disk_bytes(folder: str) -> int:
    """Bytes of a checkpoint folder's weight files (safetensors, or PyTorch ``.bin``)."""
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
               if f.endswith((".safetensors", ".bin")))


def has_safetensors(folder: str) -> bool:
    """Whether a checkpoint folder stores its weights as safetensors (what `save_sliced` reads)."""
    return any(f.endswith(".safetensors") for f in os.listdir(folder))


def disk_summary(source: str, written: str) -> dict:
    """On-disk format and safetensors bytes of a source checkpoint folder and of the pruned one written from it."""
    return {"format_before": format_name(raw_config(source), source), "bytes_before": disk_bytes(source),
            "format_after": format_name(raw_config(written), written), "bytes_after": disk_bytes(written)}


_FP8_PATCHED = False


def fp8_ragged_blocks() -> None:
    """Make transformers' FP8 dequantization right for weights whose sides are not whole blocks (ours, for
    transformers 5.25; idempotent).

    transformers derives the block from the weight and the scale grid (rows / scale rows): right when every
    side is a whole number of blocks, wrong when the last block is partial. DeepSeek-V3's ``kv_a_proj_with_mqa``
    is 576 = 4.5 x 128 rows with 5 block rows: transformers refuses it ("not divisible by scale grid"), and a
    192-row weight (1.5 blocks, 2 block rows) is silently scaled with 96-row blocks. Where the op knows the
    checkpoint's ``weight_block_size`` and the grid is the ceiling of the weight over it with a partial last
    block, each scale is spread over its block (``repeat_interleave``) and cut to the weight; every other case
    (whole blocks, FP4, per-tensor scales) goes to transformers' own code unchanged.
    """
    global _FP8_PATCHED
    if _FP8_PATCHED:
        return
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    original = Fp8Dequantize._dequantize_one

    def dequantize_one(self, quantized, scales, output_dtype=None):
        config = getattr(getattr(self, "hf_quantizer", None), "quantization_config", None)
        block = getattr(config, "weight_block_size", None)
        if (block and quantized.dim() >= 2 and scales.dim() >= 2 and quantized.dtype != torch.int8
                and quantized.element_size() == 1):
            rows, cols = quantized.shape[-2:]
            grid = (-(-rows // block[0]), -(-cols // block[1]))
            if tuple(scales.shape[-2:]) == grid and (rows % block[0] or cols % block[1]):
                return ragged_dequantize(quantized, scales, block, output_dtype or torch.bfloat16)
        return original(self, quantized, scales, output_dtype)

    Fp8Dequantize._dequantize_one = dequantize_one
    _FP8_PATCHED = True


def ragged_dequantize(quantized: torch.Tensor, scales: torch.Tensor, block, dtype: torch.dtype) -> torch.Tensor:
    """``quantized * scale of its block`` with blocks of ``block = (rows, cols)``, the last ones partial."""
    rows, cols = quantized.shape[-2:]
    s = (scales.to(torch.float32) - 127.0).exp2() if scales.dtype == torch.uint8 else scales.to(torch.float32)
    s = s.repeat_interleave(block[0], dim=-2)[..., :rows, :].repeat_interleave(block[1], dim=-1)[..., :cols]
    return (quantized.to(torch.float32) * s).to(dtype)


def dequantizing_quantizer(config, device: str | torch.device):
    """transformers' quantizer for a pre-quantized config, set to dequantize as it loads (its own FP8 / MXFP4
    code), or None for an unquantized checkpoint. Used to read one layer at a time: the statistics then equal
    those of ``from_pretrained``'s dequantized model."""
    if quantization(config) is None:
        return None
    from transformers.quantizers.auto import AutoHfQuantizer

    fp8_ragged_blocks()
    if not AutoHfQuantizer.supports_quant_method(quantization(config)):
        raise MoEError(f"quantization {quant_method(config)!r} is not one transformers can read; moebench reads what "
                       "transformers reads (FP8 block-quantized, MXFP4, ...)")
    quantizer = AutoHfQuantizer.from_config(config.quantization_config, pre_quantized=True)
    if hasattr(quantizer.quantization_config, "dequantize"):
        quantizer.quantization_config.dequantize = True
    quantizer.validate_environment(device_map={"": str(device)}, weights_only=True)
    return quantizer


def quantized_experts(view: MoEView) -> dict[int, str]:
    """MoE layers whose routed experts are held quantized in memory (transformers keeps FP8 on a GPU of compute
    capability >= 8.9: ``FP8Experts`` with ``*_scale_inv``; MXFP4 with ``*_blocks``), with the module's type."""
    found = {}
    for layer in view.layers:
        tensors = list(layer.experts.named_parameters(recurse=False)) + list(layer.experts.named_buffers(recurse=False))
        if any(name.endswith(("_scale_inv", "_blocks", "_scales")) or (t.is_floating_point() and t.element_size() < 2)
               for name, t in tensors):
            found[layer.index] = type(layer.experts).__name__
    return found


def quantized_experts_refusal(view: MoEView) -> str | None:
    """Why the statistics pass cannot observe this model's experts (kept quantized), with the fix; None if it can."""
    found = quantized_experts(view)
    if not found:
        return None
    first = min(found)
    return (f"the routed experts are held quantized in memory ({found[first]} in MoE layer {first} and "
            f"{len(found) - 1} more): transformers keeps FP8 on this GPU, and the statistics pass observes "
            "full-precision experts. Calibrate one layer at a time with --sequential (sequential=true in model_args): "
            "each layer is dequantized by transformers' own code as it is read, on this GPU, and the pruned "
            "checkpoint is still written in the source's format")


# bytes in memory per byte on disk when transformers dequantizes to bf16: FP8 -> 2; MXFP4 -> 16 / 4.25 bits (the
# experts only; the other weights are bf16 on disk already, so this bounds the whole from above)
DEQUANTIZED_GROWTH = {"fp8": 2.0, "mxfp4": 16 / 4.25}


def memory_growth(config, device: str | torch.device) -> float:
    """How much larger than on disk the weights are once loaded on ``device``: 1 for an unquantized checkpoint or
    one transformers keeps quantized there (FP8 on a GPU of compute capability >= 8.9, say), otherwise the
    dequantization's growth (transformers dequantizes FP8 and MXFP4 on a CPU)."""
    method = quant_method(config)
    if method not in DEQUANTIZED_GROWTH:
        return 1.0
    try:
        from transformers.quantizers.auto import AutoHfQuantizer

        quantizer = AutoHfQuantizer.from_config(quantization(config), pre_quantized=True)
        quantizer.validate_environment(device_map={"": str(device)}, weights_only=True)
        kept = not getattr(quantizer.quantization_config, "dequantize", False)
    except Exception:  # cannot tell: assume the larger, dequantized size
        kept = False
    return 1.0 if kept and torch.device(device).type != "cpu" else DEQUANTIZED_GROWTH[method]


# ----- writing a pruned checkpoint from its source's tensors --------------------------------------------

def writer_refusal(config, folder: str, *, merges: bool, uniform: bool, save_dtype: torch.dtype | None) -> str | None:
    """Why a plan cannot be written from this source (None when it can): merged experts have new weights
    (no source tensor to copy; they would be quantized again), and per-layer counts need moebench's fused
    layout, which a quantized or MTP checkpoint has not."""
    if not merges and uniform:
        return None
    what = "merges experts (new weights)" if merges else "keeps different expert counts per layer"
    mtp = mtp_indices(config, folder)
    if mtp:
        return (f"the plan {what}; this checkpoint has {len(mtp)} MTP layer(s), which moebench prunes from "
                "the source's tensors only: use a pruning method with one budget for every layer (--ratio or --keep)")
    if quant_method(config) and save_dtype is None:
        return (f"the plan {what}, which cannot be written in the source's {format_name(config, folder)} without "
                "quantizing weights again; write it dequantized with --save-dtype bf16 (save_dtype=bf16 in "
                "model_args)")
    return None


def mtp_kept(config, keep: dict[int, list[int]], folder: str) -> dict[int, list[int]]:
    """Kept expert ids of each MTP layer (``model.layers.<num_hidden_layers + j>``): the last trunk MoE layer's.
    The MTP forward is not part of transformers' model, so its routing cannot be observed; taking the last
    trunk layer's ids (ours) keeps one expert count for every MoE layer in the file."""
    if not keep:
        return {}
    ids = sorted(int(e) for e in keep[max(keep)])
    return dict.fromkeys(mtp_indices(config, folder), ids)


def _module_paths(model) -> dict[int, tuple[str, str, int]]:
    """MoE decoder-layer index -> (router module path, experts module path, expert count now)."""
    names = {id(m): n for n, m in model.named_modules()}
    return {layer.index: (names[id(layer.router)], names[id(layer.experts)], layer.num_experts)
            for layer in MoEView(model).layers}


class _Renamer:
    """Checkpoint key -> the model's key, by transformers' own conversion mapping (renamings only)."""

    def __init__(self, model):
        from transformers.conversion_mapping import get_model_conversion_mapping

        self.mapping = get_model_conversion_mapping(model)

    def __call__(self, key: str) -> str:
        for rename in self.mapping:
            key, _ = rename.rename_source_key(key)
        return key


def _layer_of(key: str) -> int | None:
    found = LAYER_KEY.search(key)
    return int(found.group(1)) if found else None


def save_sliced(source: str, model, keep: dict[int, list[int]], counts_before: dict[int, int], out_dir: str,
                record: dict | None = None, save_dtype: torch.dtype | None = None,
                progress: bool = False) -> dict:
    """Write ``source`` (a checkpoint folder) pruned to ``keep`` into ``out_dir`` from its own tensors.

    ``model``: the model the plan was made on (in memory or a layer-by-layer skeleton), for the module
    names; ``counts_before``: each MoE layer's expert count in the source; ``record``: provenance for
    config.json's ``moebench`` key. Returns ``{"shards", "bytes", "format", "mtp_kept"}``.
    """
    from tqdm.auto import tqdm


    config = raw_config(source)
    weight_map = read_weight_map(source)
    paths = _module_paths(model)
    if not paths:
        raise MoEError(f"{source}: no MoE layers found in the model")
    rename = _Renamer(model)
    router_dims = dict(MoEView(model).family.router_tensors)  # per-expert router tensors, as _prune_layer slices
    n_layers = int(_text(config).get("num_hidden_layers"))
    last = max(paths)
    keeps = {i: sorted(int(e) for e in keep.get(i, range(counts_before[i]))) for i in paths}
    if len({len(ids) for ids in keeps.values()}) > 1:
        raise MoEError("save_sliced writes one expert count for every MoE layer; the plan keeps "
                       f"{sorted({len(ids) for ids in keeps.values()})}")
    mtp = mtp_kept(config, keeps, source)
    groups: dict[int | None, list[str]] = {}
    for key in sorted(weight_map):
        groups.setdefault(_layer_of(key), []).append(key)
    layers_in_file = sorted(i for i in groups if i is not None)
    unknown = [i for i in layers_in_file if i >= n_layers and i not in mtp]
    if unknown:
        raise MoEError(f"{source}: tensors of decoder layers {unknown[:4]} beyond the {n_layers} the config declares "
                       "(and not MTP layers it announces with num_nextn_predict_layers)")
    # one shard per decoder layer, then one per other tensor (embeddings, head: large) with its scales if any
    units = [(i, groups[i]) for i in layers_in_file]
    others: dict[str, list[str]] = {}
    for key in groups.get(None, []):
        others.setdefault(re.sub(r"(_scale_inv|_blocks|_scales)$", "", key), []).append(key)
    units += [(None, keys) for keys in others.values()]
    os.makedirs(out_dir, exist_ok=True)
    shards = ShardWriter(out_dir, len(units))
    dequant = (_Dequantizer(save_dtype, (quantization(config) or {}).get("weight_block_size"))
               if save_dtype is not None else None)
    for shard, (index, unit_keys) in enumerate(tqdm(units, desc="writing pruned checkpoint", unit="shard",
                                                    disable=not progress)):
        ids = keeps.get(index) if index in keeps else mtp.get(index)
        like = index if index in paths else (last if index in mtp else None)
        tensors = {}
        with ExitStack() as stack:  # the shards of this unit only: mapped pages are let go after each unit
            handles = {}
            for key in unit_keys:
                file = weight_map[key]
                if file not in handles:
                    handles[file] = stack.enter_context(open_shard(file))
                out = _slice(key, handles[file], ids, like, index, paths, rename, counts_before, router_dims)
                if out is not None:
                    tensors[out[0]] = out[1]
        if dequant is not None:
            tensors = dequant(tensors)
        shards.write(tensors, shard)
        del tensors
        trim_heap()
    written = shards.finish()
    counts = len(keeps[last])
    out_config = _pruned_config(config, model, counts, record, save_dtype)
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(out_config, f, indent=2, sort_keys=True)
        f.write("\n")
    generation = os.path.join(source, "generation_config.json")
    if os.path.exists(generation):
        shutil.copyfile(generation, os.path.join(out_dir, "generation_config.json"))
    return {**written, "format": format_name(out_config, out_dir), "mtp_kept": {str(i): ids for i, ids in mtp.items()}}


def _slice(key, handle, ids, like, index, paths, rename, counts_before, router_dims):
    """``(output key, tensor)`` of source tensor ``key`` in the pruned checkpoint, or None when it is dropped."""
    if ids is None:  # not a MoE layer (or not a layer): copied as stored
        return key, handle.get_tensor(key)
    router, experts, _ = paths[like]
    model_key = rename(key if index == like else key.replace(f"layers.{index}.", f"layers.{like}.", 1))
    n = counts_before[like]
    if model_key.startswith(experts + "."):
        found = PER_EXPERT.search(key)
        if found and int(found.group(1)) < n:
            e = int(found.group(1))
            if e not in ids:
                return None
            return key[:found.start(1)] + str(ids.index(e)) + key[found.end(1):], handle.get_tensor(key)
        return key, _rows(handle, key, ids, n)
    if model_key.startswith(router + "."):
        dim = router_dims.get(model_key[len(router) + 1:])
        if dim is not None:
            t = handle.get_tensor(key)
            if t.shape[dim] != n:
                raise MoEError(f"{key}: router tensor of shape {list(t.shape)} has no {n} experts along dim {dim}")
            return key, t.index_select(dim, torch.tensor(ids, dtype=torch.long))
    return key, handle.get_tensor(key)


def _rows(handle, key: str, ids: list[int], n: int) -> torch.Tensor:
    """Rows ``ids`` of a ``[E, ...]`` source tensor, reading only those rows."""
    view = handle.get_slice(key)
    shape = view.get_shape()
    if not shape or shape[0] != n:
        raise MoEError(f"{key}: a routed-expert tensor of shape {list(shape)} whose first dimension is not the "
                       f"layer's {n} experts; moebench cannot tell how to slice it")
    return torch.stack([view[e] for e in ids]) if ids else torch.empty(0, *shape[1:])


class _Dequantizer:
    """Quantized tensors of one layer -> ``dtype`` by transformers' own FP8 / MXFP4 code; floats cast."""

    def __init__(self, dtype: torch.dtype, block=None):
        from transformers.integrations.finegrained_fp8 import Fp8Dequantize

        self.dtype, self.block = dtype, block
        self.fp8 = Fp8Dequantize(None)

    def __call__(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from transformers.integrations.mxfp4 import convert_moe_packed_tensors

        out = {}
        for key, t in tensors.items():
            if key.endswith("_scale_inv") and key[: -len("_scale_inv")] in tensors:
                continue
            if key.endswith("_scales") and key[: -len("_scales")] + "_blocks" in tensors:
                continue
            if key + "_scale_inv" in tensors:
                scales = tensors[key + "_scale_inv"]
                partial = self.block and t.dim() >= 2 and (t.shape[-2] % self.block[0] or t.shape[-1] % self.block[1])
                out[key] = (ragged_dequantize(t, scales, self.block, self.dtype) if partial
                            else self.fp8._dequantize_one(t, scales, self.dtype))
            elif key.endswith("_blocks") and key[: -len("_blocks")] + "_scales" in tensors:
                base = key[: -len("_blocks")]
                out[base] = convert_moe_packed_tensors(t, tensors[base + "_scales"], dtype=self.dtype)
            else:
                out[key] = t.to(self.dtype) if t.is_floating_point() else t
        return out


def _pruned_config(config: dict, model, count: int, record: dict | None, save_dtype) -> dict:
    """The source's config.json with the expert count (under every name the source uses) set to ``count``;
    ``quantization_config`` kept unless writing dequantized."""
    out = json.loads(json.dumps(config))
    text = _text(out)
    view = MoEView(model)
    key = view.family.count_key
    attribute_map = getattr(type(view.config), "attribute_map", {}) or {}
    canonical = attribute_map.get(key, key)
    names = {key, canonical} | {alias for alias, target in attribute_map.items() if target == canonical}
    for name in names:
        if name in text or name == key:
            text[name] = count
    text.pop("moebench_experts_per_layer", None)
    if record is not None:
        out["moebench"] = record
    if save_dtype is not None:
        out.pop("quantization_config", None)
        text.pop("quantization_config", None)
        name = str(save_dtype).removeprefix("torch.")
        for target in (out, text):
            target["dtype"] = name
            target.pop("torch_dtype", None)
    return out
