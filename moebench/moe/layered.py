"""A checkpoint opened for one-decoder-layer-at-a-time work: models larger than memory.

`LayeredCheckpoint(name_or_path)` builds the model's skeleton with every parameter on the meta
device (buffers, such as the rotary frequencies, are real: they are computed from the config, not
read) and reads the safetensors index, grouping the checkpoint's tensor names by decoder layer.
`materialise(i)` reads only decoder layer ``i``'s tensors from the shards (`safetensors.safe_open`)
and loads them into the skeleton through transformers' own checkpoint conversion (per-expert
checkpoint keys are fused into the ``[E, ...]`` tensors as ``from_pretrained`` fuses them);
`release(module)` returns a module's parameters to the meta device. At most one layer's weights
(plus the embeddings while the first inputs are made) are ever in memory.

Quantized checkpoints (FP8 with block scales, MXFP4) go through transformers' own quantizer, set to
dequantize (`moebench.moe.formats.dequantizing_quantizer`): each layer's weights and scales are read
together and dequantized as ``from_pretrained`` dequantizes them. Multi-token-prediction layers
(``model.layers.<num_hidden_layers>...``, which transformers does not build) are kept apart in
``mtp_keys``.

`layer_inputs(tokens, batch_size)` runs the model's own forward with every decoder layer replaced
by a recorder, so the embeddings, the attention masks and the rotary position embeddings are the
ones the model itself computes; it returns the first layer's inputs and the keyword arguments each
layer is called with, per batch.
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from contextlib import ExitStack, contextmanager, suppress

import torch
from torch import nn

from moebench.moe.files import (  # noqa: F401  (LAYER_KEY, INDEX_FILE, SINGLE_FILE: imported from here too)
    INDEX_FILE,
    LAYER_KEY,
    SINGLE_FILE,
    LayeredLoadError,
    open_shard,
    trim_heap,
)
from moebench.moe.files import weight_map as _weight_map

LAYERED_ATTR = "_moebench_layered"  # on a skeleton model: the LayeredCheckpoint it came from


def tensor_digest(name: str, t: torch.Tensor) -> bytes:
    """What the fingerprint reads of one tensor: name, shape, dtype and a strided sample of 64 values."""
    flat = t.detach().reshape(-1)
    sample = flat[:: max(1, flat.numel() // 64)][:64]
    return f"{name}{tuple(t.shape)}{t.dtype}".encode() + sample.to("cpu", torch.float64).numpy().tobytes()


def combine_digests(digests: dict[str, bytes]) -> str:
    """The fingerprint from every tensor's `tensor_digest`, in name order."""
    h = hashlib.sha256()
    for name in sorted(digests):
        h.update(digests[name])
    return h.hexdigest()[:16]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of a causal LM (``model.model.layers``)."""
    from moebench.moe.view import _decoder_layers

    return _decoder_layers(model)


class _Stop(Exception):
    """Raised by the last recorder: the rest of the forward pass is not needed."""


class _Recorder(nn.Module):
    """Stands in for a decoder layer: keeps the keyword arguments it is called with, passes its input on."""

    def __init__(self, layer: nn.Module, index: int, seen: dict, last: bool):
        super().__init__()
        object.__setattr__(self, "_layer", layer)  # not a submodule: its attributes are read through
        self.index, self.seen, self.last = index, seen, last

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_layer"), name)

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise LayeredLoadError(f"decoder layer {self.index} is called with positional arguments beyond the "
                                   "hidden states; layer-by-layer work needs transformers >= 5 decoder layers")
        self.seen[self.index] = (hidden_states, kwargs)
        if self.last:
            raise _Stop
        return hidden_states


def _to(value, device, memo: dict):
    """``value`` with every tensor moved to ``device`` (a tensor shared by several layers is moved once)."""
    if isinstance(value, torch.Tensor):
        if id(value) not in memo:
            memo[id(value)] = value.to(device)
        return memo[id(value)]
    if isinstance(value, dict):
        return {k: _to(v, device, memo) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device, memo) for v in value)
    return value


class LayeredCheckpoint:
    """A safetensors checkpoint (hub id, folder or registered name) with the model as a meta skeleton.

    Attributes:
        path: the local checkpoint folder; ``model``: the skeleton (meta parameters, real buffers);
        ``layer_keys[i]``: checkpoint tensor names of decoder layer ``i``; ``other_keys``: the rest
        (embeddings, final norm, head).
    """

    def __init__(self, name_or_path: str, dtype="auto", device: str = "cpu", revision: str | None = None,
                 trust_remote_code: bool = False):
        from accelerate import init_empty_weights

        from moebench.moe.checkpoint import (
            _build_skeleton,
            _config_dtype,
            download_snapshot,
            per_layer_counts,
            read_config,
            resolve,
        )
        from moebench.moe.formats import dequantizing_quantizer, mtp_layers

        path = resolve(name_or_path)
        self.path = path if os.path.isdir(path) else download_snapshot(path, revision)
        config = read_config(self.path, trust_remote_code=trust_remote_code)
        # a quantized checkpoint (FP8 blocks, MXFP4) is dequantized layer by layer by transformers' own code
        self.quantizer = dequantizing_quantizer(config, device)
        self.dtype = _config_dtype(config) if dtype == "auto" else (getattr(torch, dtype) if isinstance(dtype, str)
                                                                     else dtype)
        self.device = torch.device(device)
        with init_empty_weights(include_buffers=False):
            self.model = _build_skeleton(config, per_layer_counts(config) or {}, dtype=self.dtype,
                                         trust_remote_code=trust_remote_code).eval()
            if self.quantizer is not None:
                self.quantizer.preprocess_model(model=self.model, dtype=self.dtype, device_map={"": str(device)},
                                                checkpoint_files=[])
        for module in self.model.modules():  # buffers only: the parameters stay on the meta device
            for name, buffer in module.named_buffers(recurse=False):
                if not buffer.is_meta:
                    module._buffers[name] = buffer.to(self.device)
        self.weight_map = _weight_map(self.path)
        self.layer_keys: dict[int, list[str]] = defaultdict(list)
        self.other_keys: list[str] = []
        self.mtp_keys: dict[int, list[str]] = defaultdict(list)  # MTP layers: not part of transformers' model
        n_layers = len(decoder_layers(self.model))
        mtp = range(n_layers, n_layers + mtp_layers(config))
        for name in sorted(self.weight_map):
            found = LAYER_KEY.search(name)
            if found and int(found.group(1)) in mtp:
                self.mtp_keys[int(found.group(1))].append(name)
            else:
                (self.layer_keys[int(found.group(1))] if found else self.other_keys).append(name)
        object.__setattr__(self.model, LAYERED_ATTR, self)  # not a submodule
        names = {}
        self.tied: dict[str, str] = {}  # parameter name -> the name it shares its tensor with
        for name, p in self.model.named_parameters(remove_duplicate=False):
            if id(p) in names:
                self.tied[name] = names[id(p)]
            names.setdefault(id(p), name)
        if getattr(self.model.config, "tie_word_embeddings", False) and hasattr(self.model,
                                                                                "get_expanded_tied_weights_keys"):
            self.tied.update(self.model.get_expanded_tied_weights_keys(all_submodels=True))  # as from_pretrained ties
        self.layer_names = {i: name for name, module in self.model.named_modules()
                            for i, layer in enumerate(decoder_layers(self.model)) if module is layer}
        self._fingerprint: str | None = None
        if sorted(self.layer_keys) != list(range(n_layers)):
            raise LayeredLoadError(f"{self.path}: the checkpoint holds tensors of decoder layers "
                                   f"{sorted(self.layer_keys)[:8]}..., the config declares {n_layers} layers"
                                   + (f" and {len(mtp)} MTP layer(s)" if len(mtp) else ""))

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The checkpoint tensors ``names``, read from their shards (each shard opened once)."""
        by_file = defaultdict(list)
        for name in names:
            by_file[self.weight_map[name]].append(name)
        tensors = {}
        with ExitStack() as stack:
            for file, keys in by_file.items():
                handle = stack.enter_context(open_shard(file))
                for key in keys:
                    tensors[key] = handle.get_tensor(key)
        return tensors

    def load_from_shards(self, names: list[str]) -> None:
        """Load the checkpoint tensors ``names`` into the skeleton, each read from its shard only when
        transformers' conversion needs it (lazy slices, read one after another, not all up front)."""
        by_file = defaultdict(list)
        for name in names:
            by_file[self.weight_map[name]].append(name)
        previous = os.environ.get("HF_DEACTIVATE_ASYNC_LOAD")
        os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "1"  # no reading ahead on a thread pool: bounded memory
        try:
            with ExitStack() as stack:
                slices = {}
                for file, keys in by_file.items():
                    handle = stack.enter_context(open_shard(file))
                    slices.update({key: handle.get_slice(key) for key in keys})
                self.load(slices)
        finally:
            if previous is None:
                os.environ.pop("HF_DEACTIVATE_ASYNC_LOAD", None)
            else:
                os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = previous

    def load(self, tensors: dict) -> None:
        """Load checkpoint tensors (or safetensors slices) into the skeleton through transformers' conversion."""
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig

        from moebench.moe.checkpoint import loading_bars

        config = LoadStateDictConfig(device_map={"": str(self.device)}, dtype=self.dtype, hf_quantizer=self.quantizer,
                                     weight_mapping=get_model_conversion_mapping(self.model, None, self.quantizer))
        with loading_bars(quiet=True):
            info, _ = convert_and_load_state_dict_in_model(self.model, tensors, config)
        if info.mismatched_keys or info.unexpected_keys or info.conversion_errors:
            raise LayeredLoadError(
                f"{self.path}: tensors do not fit the model built from its config: mismatched "
                f"{sorted(info.mismatched_keys)[:3]}, unexpected {sorted(info.unexpected_keys)[:3]}, "
                f"conversion errors {list(info.conversion_errors)[:3]}")

    def materialise(self, index: int) -> nn.Module:
        """Decoder layer ``index`` with its weights read from the shards; every parameter is real after it."""
        layer = decoder_layers(self.model)[index]
        self.load_from_shards(self.layer_keys[index])
        meta = [name for name, p in layer.named_parameters() if p.is_meta]
        if meta:
            raise LayeredLoadError(f"{self.path}: decoder layer {index} lacks {meta[:3]} in the checkpoint")
        return layer

    @contextmanager
    def routers(self):
        """Inside the block every MoE layer's router holds its real weights; afterwards they are on the meta
        device again. Each decoder layer's tensors other than its routed experts are read in turn (a pass
        over the checkpoint without the experts); only the routers (``[E, H]`` each) stay in memory."""
        from moebench.moe.ops import _replace_tensor
        from moebench.moe.view import MoEView

        layers = MoEView(self.model).layers
        decoders = decoder_layers(self.model)
        try:
            for layer in layers:
                self.load_from_shards([k for k in self.layer_keys[layer.index] if ".experts." not in k])
                saved = {name: p.detach().clone() for name, p in layer.router.named_parameters()}
                self.release(decoders[layer.index])
                for name, tensor in saved.items():
                    _replace_tensor(layer.router, name, tensor)
                missing = [name for name, p in layer.router.named_parameters() if p.is_meta]
                if missing:
                    raise LayeredLoadError(f"{self.path}: the router of decoder layer {layer.index} lacks {missing} "
                                           "in the checkpoint")
            yield layers
        finally:
            for layer in layers:
                self.release(layer.router)

    @staticmethod
    def release(module: nn.Module) -> None:
        """Return ``module``'s parameters to the meta device (their memory is freed; buffers stay)."""
        for sub in module.modules():
            for name, p in list(sub.named_parameters(recurse=False)):
                if not p.is_meta:
                    setattr(sub, name, nn.Parameter(p.to("meta"), requires_grad=p.requires_grad))
        trim_heap()

    def fingerprint(self) -> str:
        """The statistics-cache fingerprint of the loaded model (`moebench.calib.cache.model_fingerprint`),
        computed one decoder layer (and one other tensor) at a time; a full read of the checkpoint,
        memoised per checkpoint (its files' names, sizes and times) under ``$MOEBENCH_CACHE/fingerprints``."""
        if self._fingerprint is None:
            memo = self._memo_path()
            if os.path.exists(memo):
                with open(memo, encoding="utf-8") as f:
                    self._fingerprint = f.read().strip()
            else:
                self._fingerprint = self._compute_fingerprint()
                from moebench.util import atomic_write_text

                os.makedirs(os.path.dirname(memo), exist_ok=True)
                atomic_write_text(memo, self._fingerprint)
        return self._fingerprint

    def _memo_path(self) -> str:
        from moebench.util import cache_root

        root = cache_root()
        h = hashlib.sha256(os.path.realpath(self.path).encode())
        for file in [*sorted(set(self.weight_map.values())), os.path.join(self.path, "config.json")]:
            st = os.stat(file)  # the change time and inode too: `cp -p` or `touch -r` can set the mtime back, not these
            h.update(f"{os.path.basename(file)}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_dev}:"
                     f"{st.st_ino}:{self.dtype}".encode())
        return os.path.join(root, "fingerprints", h.hexdigest()[:32])

    def _compute_fingerprint(self) -> str:
        digests = {}
        params = dict(self.model.named_parameters())
        for key in self.other_keys:  # embeddings, final norm, head: one tensor at a time
            self.load(self.read([key]))
            for name, _p in params.items():
                current = self.model.get_parameter(name)
                inside = any(name.startswith(prefix + ".") for prefix in self.layer_names.values())
                if not current.is_meta and not inside:
                    digests[name] = tensor_digest(name, current)
                    self.release(self.model.get_submodule(name.rpartition(".")[0]))
        for index in self.layer_keys:
            layer = self.materialise(index)
            for name, t in layer.state_dict(prefix=self.layer_names[index] + ".").items():
                digests[name] = tensor_digest(name, t)
            self.release(layer)
        for name, t in self.model.state_dict().items():  # buffers outside the layers (computed, not read)
            if name not in digests and name not in self.tied and not t.is_meta:
                digests[name] = tensor_digest(name, t)
        for alias, source in self.tied.items():
            if source in digests:
                digests[alias] = digests[source].replace(source.encode(), alias.encode(), 1)
        missing = [name for name in self.model.state_dict() if name not in digests]
        if missing:
            raise LayeredLoadError(f"{self.path}: the checkpoint lacks {missing[:3]} "
                                   "(of the model built from its config)")
        return combine_digests(digests)

    def layer_inputs(self, tokens: torch.Tensor, batch_size: int):
        """``(hidden [per batch, CPU], kwargs[layer][batch])``: the first decoder layer's input per batch
        of ``tokens [S, L]`` and the keyword arguments (masks, position embeddings) of every layer."""
        layers = decoder_layers(self.model)
        originals = list(layers)
        embed = self.model.get_input_embeddings()
        self.load_from_shards([k for k in self.other_keys if _is_embedding(k, self.model)])
        hidden, kwargs = [], defaultdict(list)
        try:
            for start in range(0, tokens.shape[0], batch_size):
                seen = {}
                for i, layer in enumerate(originals):
                    layers[i] = _Recorder(layer, i, seen, last=i == len(originals) - 1)
                with suppress(_Stop):
                    self.model(input_ids=tokens[start:start + batch_size].to(self.device), use_cache=False)
                memo = {}
                hidden.append(seen[0][0].detach().to("cpu"))
                for i in range(len(originals)):
                    kwargs[i].append(_to(seen[i][1], "cpu", memo))
        finally:
            for i, layer in enumerate(originals):
                layers[i] = layer
            self.release(embed)
        return hidden, kwargs


def _is_embedding(key: str, model: nn.Module) -> bool:
    """Whether checkpoint tensor ``key`` belongs to the input embeddings (the only non-layer tensor read)."""
    embed = model.get_input_embeddings()
    leaf = next(name for name, module in model.named_modules() if module is embed).rsplit(".", 1)[-1]
    return f"{leaf}." in key or key.startswith(leaf)


def to_device(value, device):
    """``value`` (a batch's layer keyword arguments) with its tensors on ``device``."""
    return _to(value, device, {})
