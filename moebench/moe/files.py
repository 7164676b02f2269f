"""Safetensors checkpoint folders, tensor by tensor: the index, the layer a key belongs to, shards written one
at a time. Imports nothing else of moebench (the layer-by-layer engine, the format-keeping writer and the
streaming writer all build on it)."""

from __future__ import annotations

import json
import os
import re

import torch

LAYER_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def trim_heap() -> None:
    """Hand freed heap memory back to the system (glibc keeps a freed layer's many few-MB tensors, such as
    per-expert checkpoint tensors, in its heap otherwise, and the process grows layer after layer)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


class LayeredLoadError(ValueError):
    """A checkpoint that cannot be read one layer at a time; the message says why and the fix."""


def weight_map(folder: str) -> dict[str, str]:
    """Checkpoint tensor name -> shard file (absolute path) of a safetensors checkpoint folder."""
    index = os.path.join(folder, INDEX_FILE)
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            mapping = json.load(f).get("weight_map")
        if not isinstance(mapping, dict) or not mapping:
            raise LayeredLoadError(f"{index}: no weight_map; the checkpoint index is damaged (download it again)")
        return {name: os.path.join(folder, shard) for name, shard in mapping.items()}
    single = os.path.join(folder, SINGLE_FILE)
    if os.path.exists(single):
        with open_shard(single) as f:
            return dict.fromkeys(f.keys(), single)
    raise LayeredLoadError(f"{folder}: neither {INDEX_FILE} nor {SINGLE_FILE}; layer-by-layer work reads "
                           "safetensors checkpoints only (save the model with save_pretrained first)")


class ShardWriter:
    """Writes a checkpoint's shards one at a time (``model-0000i-of-0000n.safetensors``) and, last, the index."""

    def __init__(self, folder: str, n_shards: int):
        self.folder, self.n_shards = folder, n_shards
        self.weight_map: dict[str, str] = {}
        self.total = 0

    def write(self, tensors: dict[str, torch.Tensor], shard: int) -> None:
        from safetensors.torch import save_file

        name = f"model-{shard + 1:05d}-of-{self.n_shards:05d}.safetensors"
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        save_file(tensors, os.path.join(self.folder, name), metadata={"format": "pt"})
        for key, t in tensors.items():
            self.weight_map[key] = name
            self.total += t.numel() * t.element_size()

    def finish(self) -> dict[str, int]:
        """Write the index as transformers does; ``{"shards", "bytes"}``."""
        with open(os.path.join(self.folder, INDEX_FILE), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": self.total}, "weight_map": dict(sorted(self.weight_map.items()))},
                      f, indent=2)
            f.write("\n")
        return {"shards": len(set(self.weight_map.values())), "bytes": self.total}


def open_shard(path: str):
    """``safetensors.safe_open(path)``; a damaged file (truncated, a corrupt header) raises `LayeredLoadError`
    naming it instead of safetensors' own error, which names no file."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(path, framework="pt")
    except SafetensorError as err:
        raise LayeredLoadError(f"{path}: damaged safetensors file ({err}); download or write it again") from None


def damaged_shards(folder: str) -> list[str]:
    """The safetensors files of ``folder`` that cannot be opened, each with why (for an error message)."""
    found = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            try:
                with open_shard(os.path.join(folder, name)):
                    pass
            except LayeredLoadError as err:
                found.append(str(err))
    return found
