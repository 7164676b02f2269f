"""Loading and saving (pruned) MoE checkpoints.

A checkpoint pruned to the same expert count in every layer is an ordinary transformers
checkpoint: `save_pruned` writes it in the family's original format and plain
``AutoModelForCausalLM.from_pretrained`` loads it. With different counts per layer, transformers
cannot build the model from its config (one count per model), so `save_pruned` writes the fused
tensors as they are plus ``moebench_experts_per_layer`` in config.json, warns, and only
`load_model` can load it back: it builds the model with the largest count, cuts each layer to
its own count, then loads the tensors.
"""

from __future__ import annotations

import glob
import logging
import os
import warnings
from collections.abc import Callable

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from moebench.moe.ops import _prune_layer
from moebench.moe.view import MoEView
from moebench.util import atomic_folder, load_plugins

log = logging.getLogger(__name__)

PER_LAYER_KEY = "moebench_experts_per_layer"


class NonUniformCheckpointWarning(UserWarning):
    """Saved a checkpoint with per-layer expert counts, which plain transformers cannot load."""


# Model-name resolvers registered by plugins (the testbed: ``testbed-8e`` -> its package folder).
# Each maps a name to a local folder, or returns None when the name is not one of its models.
_RESOLVERS: list = []


def register_models(resolver) -> None:
    """Register ``resolver(name) -> folder | None`` for model names a plugin provides (idempotent)."""
    if resolver not in _RESOLVERS:
        _RESOLVERS.append(resolver)


def resolve(name_or_path: str) -> str:
    """A registered model name (a testbed model, say) -> its folder; any other hub id or path unchanged."""
    looks_like_path = name_or_path.startswith(("/", "./", "../", "~")) or os.sep + os.sep in name_or_path
    if looks_like_path and not os.path.isdir(os.path.expanduser(name_or_path)):
        raise FileNotFoundError(f"no model folder at {name_or_path}; give an existing folder, a hub id "
                                "(org/name) or a testbed model name (moebench zoo list)")
    name = os.path.expanduser(name_or_path)
    load_plugins()
    for resolver in _RESOLVERS:
        folder = resolver(name)
        if folder is not None:
            return str(folder)
    return name


def per_layer_counts(config) -> dict[int, int] | None:
    """Expert count per MoE decoder layer recorded by moebench in a config, or None if uniform."""
    text = getattr(config, "text_config", None) or config
    counts = getattr(text, PER_LAYER_KEY, None)
    return {int(k): int(v) for k, v in counts.items()} if counts else None


def save_pruned(model, out_dir: str, shown_as: str | None = None, **save_kwargs) -> None:
    """Save a (pruned) model; non-uniform counts are saved in moebench's loadable form, with a warning.

    ``shown_as``: the folder to name in that warning when ``out_dir`` is a temporary one.
    """
    counts = per_layer_counts(model.config)
    if counts is None:
        model.save_pretrained(out_dir, **save_kwargs)
        return
    warnings.warn(
        f"experts per layer differ ({sorted(set(counts.values()))}): plain transformers cannot load this "
        f"checkpoint (its config holds one expert count); load it with moebench.moe.checkpoint.load_model("
        f"'{shown_as or out_dir}') or any moebench command", NonUniformCheckpointWarning, stacklevel=2)
    model.save_pretrained(out_dir, save_original_format=False, **save_kwargs)


def save_folder(out_dir: str, files: dict[str, Callable[[str], None]]) -> list[str]:
    """Write a checkpoint folder all at once: ``files`` maps a label to ``writer(folder)``.

    The writers run in order on a temporary sibling folder, which is then renamed to ``out_dir``:
    a killed or failed run (a full disk, say) leaves no partial ``out_dir``, and its leftover is
    removed by the next run (`moebench.util.atomic_folder`). Returns the leftovers removed. E.g.
    ``{"checkpoint": lambda d: save_pruned(model, d), "tokenizer": tokenizer.save_pretrained}``.
    """

    def write(folder: str) -> None:
        for writer in files.values():
            writer(folder)

    return atomic_folder(out_dir, write)


def _build_skeleton(config, counts: dict[int, int], **from_config_kwargs):
    """A model from ``config`` whose layers are cut to ``counts`` experts (random weights)."""
    model = AutoModelForCausalLM.from_config(config, **from_config_kwargs)
    view = MoEView(model)
    for index, n in counts.items():
        _prune_layer(view.layer(index), list(range(n)))
    return model


def _load_state_dict(folder: str) -> dict[str, torch.Tensor]:
    """All tensors of the safetensors files in a checkpoint folder."""
    from safetensors.torch import load_file

    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {folder}")
    state = {}
    for path in files:
        state.update(load_file(path))
    return state


def load_model(name_or_path: str, dtype="auto", **kwargs):
    """Load a causal LM by hub id, folder or testbed name; also loads moebench's non-uniform checkpoints.

    Extra keyword arguments go to ``from_pretrained`` (revision, device_map, trust_remote_code, ...).
    """
    path = resolve(name_or_path)
    config = AutoConfig.from_pretrained(
        path, **{k: v for k, v in kwargs.items() if k in ("revision", "trust_remote_code")})
    counts = per_layer_counts(config)
    if counts is None:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs).eval()
    if not os.path.isdir(path):
        raise ValueError(f"{name_or_path}: non-uniform moebench checkpoints load from a local folder only")
    model = _build_skeleton(config, counts, dtype=_config_dtype(config) if dtype == "auto" else dtype)
    missing, unexpected = model.load_state_dict(_load_state_dict(path), strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match its config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    model.tie_weights()
    return model.eval()


def load_structure(name_or_path: str, **kwargs):
    """The model built on the meta device from its config alone (no weights read): for inspection."""
    path = resolve(name_or_path)
    config = AutoConfig.from_pretrained(path, **kwargs)
    with torch.device("meta"):
        return _build_skeleton(config, per_layer_counts(config) or {}, dtype=_config_dtype(config))


def _config_dtype(config) -> torch.dtype:
    """The dtype a checkpoint's config declares (float32 when it declares none)."""
    text = getattr(config, "text_config", None) or config
    dtype = getattr(text, "dtype", None) or getattr(config, "dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def default_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_with_tokenizer(name_or_path: str, dtype="auto", device: str | None = None, **kwargs):
    """``(model on device, tokenizer)`` for a hub id, folder or testbed name."""
    from transformers import AutoTokenizer

    model = load_model(name_or_path, dtype=dtype, **kwargs).to(device or default_device())
    tokenizer = AutoTokenizer.from_pretrained(resolve(name_or_path), revision=kwargs.get("revision"))
    return model, tokenizer
