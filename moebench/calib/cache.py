"""The on-disk cache of calibration statistics, one file per statistic group.

Path: ``<stats_dir>/<model key>/<calibration key>/v<format>-<settings hash>/<group>.pt``. The model
key is a readable name of the model's canonical identity (`model_identity`) plus a fingerprint of
the weights, so every front end (``moebench prune``, lm-eval's ``pruned_moe``, grid cells) finds the
same folder for the same model, and a changed (or pruned) model never reads another model's
statistics. A method needing groups the cache lacks triggers one pass
that collects only those groups.

A file holds ``{"format": FORMAT_VERSION, "group": name, "layers": {MoE layer index: {stat: tensor}}}``.
What is read is checked before use (`group_problem`: readable, format version, the model's MoE
layers, expert counts, finite values); a file that fails is named in a `StatsCacheWarning` and its
group is collected again. Files are written atomically (`moebench.util.atomic_write`): a failed
write leaves no temporary file, and a full disk is an error naming the folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import asdict

import torch

from moebench.calib.stats import FORMAT_VERSION, GROUP_STATS, CollectSettings, collect
from moebench.moe.ops import mask_signature
from moebench.moe.view import MoEView
from moebench.util import atomic_write

# Collected whenever a pass runs: they cost little beside the forward pass itself.
CHEAP_GROUPS = ("routing", "norms", "logits")


def default_stats_dir() -> str:
    """``$MOEBENCH_CACHE/stats``, default ``~/.cache/moebench/stats``."""
    root = os.environ.get("MOEBENCH_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "moebench"))
    return os.path.join(root, "stats")


def model_fingerprint(model) -> str:
    """A hash of every tensor's name, shape, dtype and a strided sample of its values."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 64)][:64]
        h.update(sample.to("cpu", torch.float64).numpy().tobytes())
    return h.hexdigest()[:16]


def model_identity(name_or_path: str, revision: str | None = None) -> str:
    """The canonical identity of a model as a user names it.

    A registered name (``testbed-8e``) or a local folder (relative, absolute, through a link) ->
    the folder's real path; a hub id stays itself, with ``@revision`` when one is given (a local
    folder has no revisions).
    """
    from moebench.moe.checkpoint import resolve

    try:
        path = resolve(name_or_path)
    except FileNotFoundError:  # a folder that is gone (a model built in memory, say): its name as given
        path = name_or_path
    if os.path.isdir(path):
        return os.path.realpath(path)
    return f"{name_or_path}@{revision}" if revision else name_or_path


def model_key(model, name_or_path: str | None, revision: str | None = None) -> str:
    """The statistics folder name of a model: readable name of its identity, fingerprint, mask.

    The readable part is the folder name for a local model, ``org--name[@revision]`` for a hub
    id; the fingerprint of the weights tells apart folders of the same name.
    """
    identity = model_identity(name_or_path or getattr(model.config, "_name_or_path", "") or "model", revision)
    if os.path.isabs(identity):
        readable = os.path.basename(identity.rstrip(os.sep))
    else:  # a hub id: org/name, then the revision (which may hold slashes: refs/pr/1)
        repo, _, rev = identity.partition("@")
        readable = "--".join(repo.rstrip("/").split("/")[-2:]) + (f"@{rev.replace('/', '-')}" if rev else "")
    readable = re.sub(r"[^A-Za-z0-9@._-]+", "_", readable) or "model"
    masked = mask_signature(model)
    return f"{readable}-{model_fingerprint(model)}" + (f"-mask{masked}" if masked else "")


def _settings_hash(settings: CollectSettings) -> str:
    relevant = {k: v for k, v in asdict(settings).items() if k != "batch_size"}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:8]


def cache_dir(stats_dir: str, key_model: str, calib_key: str, settings: CollectSettings) -> str:
    """The folder holding one (model, calibration, settings) triple's statistic groups."""
    return os.path.join(stats_dir, key_model, calib_key, f"v{FORMAT_VERSION}-{_settings_hash(settings)}")


class StatsCacheWarning(UserWarning):
    """A cached statistics file was unreadable or wrong; it is collected again."""


OPTIONAL_STATS = {"ratio_samples"}  # absent for top-1 routers
EXPERT_AXES = {"counts": (0,), "gate_sum": (0,), "softmax_sum": (0,), "coact": (0, 1), "norm_sum": (0,),
               "norm_sq_sum": (0,), "gate_norm_sum": (0,), "norm_count": (0,), "logits": (1,), "all_outputs": (1,)}
MAY_HOLD_MINUS_INF = {"topk_logits", "logits"}  # router logits of masked experts


def group_problem(data, group: str, view: MoEView) -> str | None:
    """What is wrong with a loaded cache file of ``group`` for the model of ``view``, or None."""
    if not isinstance(data, dict) or "format" not in data:
        return "it carries no format version (an older moebench wrote it, or it is not a statistics file)"
    if data["format"] != FORMAT_VERSION or data.get("group") != group:
        return (f"format {data['format']!r} of group {data.get('group')!r}; "
                f"expected format {FORMAT_VERSION} of {group!r}")
    layers = data.get("layers")
    expected = {layer.index: layer for layer in view.layers}
    if not isinstance(layers, dict) or sorted(layers) != sorted(expected):
        found = sorted(layers) if isinstance(layers, dict) else type(layers).__name__
        return f"it holds layers {found}, the model's MoE layers are {sorted(expected)}"
    for index, stats in sorted(layers.items()):
        problem = _layer_problem(stats, group, expected[index].num_experts)
        if problem:
            return f"MoE layer {index}: {problem}"
    return None


def _layer_problem(stats, group: str, n_experts: int) -> str | None:
    names = set(GROUP_STATS[group])
    if not isinstance(stats, dict) or not all(isinstance(t, torch.Tensor) for t in stats.values()):
        return "not a mapping of tensors"
    if not names - OPTIONAL_STATS <= set(stats) <= names:
        return f"statistics {sorted(stats)}, expected {sorted(names)}"
    for name, t in sorted(stats.items()):
        for axis in EXPERT_AXES.get(name, ()):
            if t.dim() <= axis or t.shape[axis] != n_experts:
                return f"{name} has shape {list(t.shape)}: not {n_experts} experts (the model's count)"
        if name == "topk_ids" and t.numel() and not 0 <= int(t.min()) <= int(t.max()) < n_experts:
            return f"topk_ids name experts outside 0..{n_experts - 1}"
        if t.is_floating_point():
            bad = torch.isnan(t) | (torch.isposinf(t) if name in MAY_HOLD_MINUS_INF else torch.isinf(t))
            if bad.any():
                return f"{name} holds {int(bad.sum())} non-finite values (NaN or inf)"
    return None


def _load_group(path: str, group: str, view: MoEView) -> dict | None:
    """The layers of a valid cache file, or None (with a `StatsCacheWarning` naming the file)."""
    try:
        data = torch.load(path, weights_only=True)
    except Exception as err:  # truncated, corrupt, not a torch file: any of these means collect again
        problem = f"it cannot be read ({type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''})"
    else:
        problem = group_problem(data, group, view)
    if problem:
        warnings.warn(f"statistics cache file {path}: {problem}; collecting the {group} statistics again",
                      StatsCacheWarning, stacklevel=3)
        return None
    return data["layers"]


def get_stats(model, tokens: Callable[[], torch.Tensor], groups, folder: str,
              settings: CollectSettings | None = None, progress: bool = True) -> dict[int, dict[str, torch.Tensor]]:
    """Statistics for ``groups``: read what ``folder`` holds, collect the rest in one pass, save it.

    ``tokens`` is called only when something must be collected (a cache hit reads no data and
    runs no forward pass). Cached files that fail `group_problem` are collected again.
    """
    settings = settings or CollectSettings()
    view = MoEView(model)
    stats: dict[int, dict[str, torch.Tensor]] = {}
    present = {g for g in GROUP_STATS if os.path.exists(os.path.join(folder, f"{g}.pt"))}
    cached = set(present)
    for group in sorted(set(groups) & present):
        layers = _load_group(os.path.join(folder, f"{group}.pt"), group, view)
        if layers is None:
            cached.discard(group)
        else:
            _merge(stats, layers)
    missing = sorted(set(groups) - cached)
    if missing:
        # A pass is the expensive part: take the cheap groups along so the next method finds them.
        missing = sorted((set(missing) | set(CHEAP_GROUPS)) - cached)
        fresh = collect(model, tokens(), missing, settings, progress=progress)
        os.makedirs(folder, exist_ok=True)
        for group in missing:
            part = {i: {n: t for n, t in s.items() if n in GROUP_STATS[group]} for i, s in fresh.items()}
            data = {"format": FORMAT_VERSION, "group": group, "layers": part}
            atomic_write(os.path.join(folder, f"{group}.pt"), lambda tmp, d=data: torch.save(d, tmp))
        _merge(stats, fresh)
    return stats


def _merge(into: dict, part: dict) -> None:
    for index, named in part.items():
        into.setdefault(int(index), {}).update(named)
