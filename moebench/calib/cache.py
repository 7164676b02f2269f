"""The on-disk cache of calibration statistics, one file per statistic group.

Path: ``<stats_dir>/<model key>/<calibration key>/v<format>-<settings hash>/<group>.pt``. The model
key is a readable name of the model's canonical identity (`model_identity`) plus a fingerprint of
the weights, so every front end (``moebench prune``, lm-eval's ``pruned_moe``, grid cells) finds the
same folder for the same model, and a changed (or pruned) model never reads another model's
statistics. A method needing groups the cache lacks triggers one pass
that collects only those groups.

A file holds ``{"format": FORMAT_VERSION, "group": name, "layers": {MoE layer index: {stat: tensor}}}``.
The ``outputs`` group (every expert's output on the subsample, ``[n, E, H]`` per layer) is kept
one file per MoE layer, ``outputs/layer-<i>.pt`` (same layout, one layer), with ``outputs.pt``
naming the layers, written last; it is read back memory-mapped on each access (`LayerStats`).
What is read is checked before use (`group_problem`: readable, format version, the model's MoE
layers, expert counts, finite values); a file that fails is named in a `StatsCacheWarning` and its
group is collected again. Files are written atomically (`moebench.util.atomic_write`): a failed
write leaves no temporary file, and a full disk is an error naming the folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable
from dataclasses import asdict

import torch

from moebench.calib.stats import FORMAT_VERSION, GROUP_STATS, CollectSettings, collect, spill_file, spill_folder
from moebench.moe.layered import LAYERED_ATTR, combine_digests, tensor_digest
from moebench.moe.ops import mask_signature
from moebench.moe.view import MoEView
from moebench.util import atomic_write, disk_full, disk_full_error

# Collected whenever a pass runs: they cost little beside the forward pass itself.
CHEAP_GROUPS = ("routing", "norms", "logits")


def default_stats_dir() -> str:
    """``$MOEBENCH_CACHE/stats``, default ``~/.cache/moebench/stats``."""
    from moebench.util import cache_root

    return os.path.join(cache_root(), "stats")


def model_fingerprint(model) -> str:
    """A hash of every tensor's name, shape, dtype and a strided sample of its values.

    A model opened layer by layer (`moebench.moe.layered`) gets the same fingerprint from its
    checkpoint, one layer at a time, as the loaded model would.
    """
    layered = getattr(model, LAYERED_ATTR, None)
    if layered is not None:
        return layered.fingerprint()
    state = model.state_dict()
    digests = {name: tensor_digest(name, t) for name, t in state.items() if not t.is_meta}
    if len(digests) < len(state):  # weights accelerate offloaded (device_map with cpu / disk): read module by module
        digests.update(_offloaded_digests(model, {name for name, t in state.items() if t.is_meta}))
    return combine_digests(digests)


def _offloaded_digests(model, names: set[str]) -> dict[str, str]:
    """Digests of the tensors ``names`` that accelerate keeps offloaded, each module's brought to the CPU in turn."""
    from accelerate.utils import align_module_device, has_offloaded_params

    found = {}
    for prefix, module in model.named_modules():
        if not has_offloaded_params(module):
            continue
        with align_module_device(module, torch.device("cpu")):
            for name, t in module.state_dict().items():
                key = f"{prefix}.{name}" if prefix else name
                if key in names and key not in found and not t.is_meta:
                    found[key] = tensor_digest(key, t)
    missing = sorted(names - set(found))
    if missing:
        raise ValueError(f"the weights {missing[:3]} are on the meta device and no accelerate hook holds them: "
                         "load the model fully (no meta tensors) before calibrating")
    return found


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
               "norm_sq_sum": (0,), "gate_norm_sum": (0,), "norm_count": (0,), "logits": (1,), "all_outputs": (1,),
               "routed_sum": (0,), "routed_sq_sum": (0,), "routed_count": (0,), "sequence_fluctuation": (0,)}
MAY_HOLD_MINUS_INF = {"topk_logits", "logits"}  # router logits of masked experts
# statistics indexed by the router's experts: where the router keeps more rows than the experts module holds
# (novice experts, merged layers that keep every router row) their expert axis is the router's
ROUTER_AXES = {"counts", "gate_sum", "softmax_sum", "coact", "logits", "topk_ids"}


def group_problem(data, group: str, view: MoEView, only: int | None = None, check: bool = True) -> str | None:
    """What is wrong with a loaded cache file of ``group`` for the model of ``view``, or None.

    ``only``: the file holds MoE layer ``only`` alone (a per-layer group's file); ``check=False``:
    the layers' statistics are not checked (a per-layer group's index, which names layers only).
    """
    if not isinstance(data, dict) or "format" not in data:
        return "it carries no format version (an older moebench wrote it, or it is not a statistics file)"
    if data["format"] != FORMAT_VERSION or data.get("group") != group:
        return (f"format {data['format']!r} of group {data.get('group')!r}; "
                f"expected format {FORMAT_VERSION} of {group!r}")
    layers = data.get("layers")
    expected = {layer.index: layer for layer in view.layers if only is None or layer.index == only}
    if not isinstance(layers, dict) or sorted(layers) != sorted(expected):
        found = sorted(layers) if isinstance(layers, dict) else type(layers).__name__
        return f"it holds layers {found}, the model's MoE layers are {sorted(expected)}"
    if not check:
        return None
    for index, stats in sorted(layers.items()):
        problem = _layer_problem(stats, group, expected[index].num_experts, expected[index].router.weight.shape[0])
        if problem:
            return f"MoE layer {index}: {problem}"
    return None


def _layer_problem(stats, group: str, n_experts: int, n_router: int | None = None) -> str | None:
    names = set(GROUP_STATS[group])
    if not isinstance(stats, dict) or not all(isinstance(t, torch.Tensor) for t in stats.values()):
        return "not a mapping of tensors"
    if not names - OPTIONAL_STATS <= set(stats) <= names:
        return f"statistics {sorted(stats)}, expected {sorted(names)}"
    for name, t in sorted(stats.items()):
        width = n_router if name in ROUTER_AXES and n_router is not None else n_experts
        for axis in EXPERT_AXES.get(name, ()):
            if t.dim() <= axis or t.shape[axis] != width:
                return f"{name} has shape {list(t.shape)}: not {width} experts (the model's count)"
        if name == "topk_ids" and t.numel() and not 0 <= int(t.min()) <= int(t.max()) < width:
            return f"topk_ids name experts outside 0..{width - 1}"
        problem = nonfinite_problem(name, t)
        if problem:
            return problem
    return None


def nonfinite_problem(name: str, t: torch.Tensor) -> str | None:
    """``"<name> holds N non-finite values (NaN or inf)"`` where a statistic holds any (-inf allowed where a
    masked router gives it), else None."""
    if not t.is_floating_point():
        return None
    bad = torch.isnan(t) | (torch.isposinf(t) if name in MAY_HOLD_MINUS_INF else torch.isinf(t))
    return f"{name} holds {int(bad.sum())} non-finite values (NaN or inf)" if bad.any() else None


class NonFiniteStatistics(ValueError):
    """Freshly collected statistics hold NaN or inf: the model's outputs are not finite."""


def _load_group(path: str, group: str, view: MoEView, check: bool = True) -> dict | None:
    """The layers of a valid cache file, or None (with a `StatsCacheWarning` naming the file)."""
    try:
        data = torch.load(path, weights_only=True)
    except Exception as err:  # truncated, corrupt, not a torch file: any of these means collect again
        problem = f"it cannot be read ({type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''})"
    else:
        problem = group_problem(data, group, view, check=check)
    if problem:
        warnings.warn(f"statistics cache file {path}: {problem}; collecting the {group} statistics again",
                      StatsCacheWarning, stacklevel=3)
        return None
    return data["layers"]


PER_LAYER_GROUPS = ("outputs",)  # one file per MoE layer, read back memory-mapped on each access


class LayerStats(dict):
    """One MoE layer's statistics. Those of a per-layer group (``outputs``: ``[n, E, H]`` per layer)
    are not held: each access reads them from their file, memory-mapped, so a method working one
    layer at a time holds one layer's outputs, whatever the number of layers."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.files: dict[str, str] = {}  # statistic name -> the per-layer file holding it

    def add_file(self, path: str, names) -> None:
        for name in names:
            super().pop(name, None)
            self.files[name] = path

    def __getitem__(self, name):
        if name in self.files:
            return _read_layer_file(self.files[name])[name]
        return super().__getitem__(name)

    def __contains__(self, name) -> bool:
        return name in self.files or super().__contains__(name)

    def get(self, name, default=None):
        return self.get(name, default)

    def keys(self):
        return [*super().keys(), *self.files]

    def __iter__(self):
        return iter(self.keys())

    def __len__(self) -> int:
        return super().__len__() + len(self.files)

    def items(self):
        return [(name, self[name]) for name in self.keys()]

    def values(self):
        return [self[name] for name in self.keys()]


def _read_layer_file(path: str) -> dict[str, torch.Tensor]:
    data = torch.load(path, weights_only=True, mmap=True)
    return next(iter(data["layers"].values()))


def _layer_file(folder: str, group: str, index: int) -> str:
    return os.path.join(folder, group, f"layer-{index}.pt")


def _save_group(path: str, group: str, layers: dict) -> None:
    data = {"format": FORMAT_VERSION, "group": group, "layers": layers}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(data, tmp))


def _load_per_layer(folder: str, group: str, view: MoEView) -> dict | None:
    """``{layer: {name: file}}`` of a per-layer group whose every file is valid, or None (with a warning)."""
    index_file = os.path.join(folder, f"{group}.pt")
    found = _load_group(index_file, group, view, check=False)
    if found is None:
        return None
    files = {}
    for layer in view.layers:
        path = _layer_file(folder, group, layer.index)
        try:
            data = torch.load(path, weights_only=True, mmap=True)
        except Exception as err:
            problem = f"it cannot be read ({type(err).__name__})"
        else:
            problem = group_problem(data, group, view, only=layer.index)
        if problem:
            warnings.warn(f"statistics cache file {path}: {problem}; collecting the {group} statistics again",
                          StatsCacheWarning, stacklevel=3)
            return None
        files[layer.index] = path
    return {index: dict.fromkeys(GROUP_STATS[group], path) for index, path in files.items()}


def get_stats(model, tokens: Callable[[], torch.Tensor], groups, folder: str,
              settings: CollectSettings | None = None, progress: bool = True) -> dict[int, LayerStats]:
    """Statistics for ``groups``: read what ``folder`` holds, collect the rest in one pass, save it.

    ``tokens`` is called only when something must be collected (a cache hit reads no data and
    runs no forward pass). Cached files that fail `group_problem` are collected again. A model
    opened layer by layer (`moebench.moe.layered`, ``sequential``) is calibrated one decoder layer
    at a time (`moebench.calib.sequential`). The ``outputs`` group is written one file per MoE
    layer and read back on access (`LayerStats`): it is never held for all layers at once (in the
    one-forward pass the expert outputs are appended to a spill file per layer as the batches
    pass, `_one_pass`).
    """
    settings = settings or CollectSettings()
    view = MoEView(model)
    stats: dict[int, LayerStats] = {layer.index: LayerStats() for layer in view.layers}
    present = {g for g in GROUP_STATS if os.path.exists(os.path.join(folder, f"{g}.pt"))}
    cached = set(present)
    for group in sorted(set(groups) & present):
        if group in PER_LAYER_GROUPS:
            files = _load_per_layer(folder, group, view)
            if files is None:
                cached.discard(group)
            else:
                for index, named in files.items():
                    stats[index].add_file(next(iter(named.values())), named)
            continue
        layers = _load_group(os.path.join(folder, f"{group}.pt"), group, view)
        if layers is None:
            cached.discard(group)
        else:
            _merge(stats, layers)
    missing = sorted(set(groups) - cached)
    if missing:
        # A pass is the expensive part: take the cheap groups along so the next method finds them.
        missing = sorted((set(missing) | set(CHEAP_GROUPS)) - cached)
        per_layer = [g for g in missing if g in PER_LAYER_GROUPS]
        with _removed_if_left_empty(folder):
            _collect_missing(model, tokens, missing, per_layer, settings, progress, folder, stats)
    return stats


@contextlib.contextmanager
def _removed_if_left_empty(folder: str):
    """Create ``folder``; if the block fails and it holds no file then, remove it again (no empty cache
    folder is left by a pass that failed before writing anything, e.g. a calibration source that cannot load)."""
    top = None  # the outermost folder this call creates
    path = os.path.abspath(folder)
    while not os.path.isdir(path):
        top, path = path, os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    try:
        yield
    except BaseException:
        if top is not None and not any(files for _, _, files in os.walk(top)):
            shutil.rmtree(top, ignore_errors=True)
        raise


def _collect_missing(model, tokens, missing, per_layer, settings, progress, folder, stats) -> None:
    """Collect the ``missing`` groups in one pass (or layer by layer) and write them to ``folder``."""

    def on_layer(index: int, layer_stats: dict) -> dict:
        for name, t in layer_stats.items():  # no plan is made from NaN scores, on either path
            problem = nonfinite_problem(name, t) if isinstance(t, torch.Tensor) else None
            if problem:
                raise NonFiniteStatistics(
                    f"MoE layer {index}: the calibration statistic {problem}: the model's weights or activations "
                    f"are not finite (NaN or inf weights in the checkpoint, or an overflow in its dtype: try "
                    "--dtype float32); no plan is made from them")
        for group in per_layer:  # written now, then dropped from memory
            part = {n: t for n, t in layer_stats.items() if n in GROUP_STATS[group]}
            _save_group(_layer_file(folder, group, index), group, {index: part})
        return {n: t for n, t in layer_stats.items() if not any(n in GROUP_STATS[g] for g in per_layer)}

    layered = getattr(model, LAYERED_ATTR, None)
    if layered is not None:
        from moebench.calib.sequential import collect_sequential

        fresh = collect_sequential(layered, tokens(), missing, settings, progress=progress, on_layer=on_layer)
    else:
        fresh = _one_pass(model, tokens, missing, settings, progress, folder, on_layer)
    for group in missing:
        if group in PER_LAYER_GROUPS:  # the group's index: which layers it has (each file holds its layer)
            _save_group(os.path.join(folder, f"{group}.pt"), group, {i: {} for i in fresh})
            for index in fresh:
                stats[index].add_file(_layer_file(folder, group, index), GROUP_STATS[group])
            continue
        part = {i: {n: t for n, t in s.items() if n in GROUP_STATS[group]} for i, s in fresh.items()}
        _save_group(os.path.join(folder, f"{group}.pt"), group, part)
    _merge(stats, fresh)


def _one_pass(model, tokens, groups, settings, progress, folder, on_layer) -> dict:
    """`collect` in one forward pass, each layer's statistics handed to ``on_layer`` after it. The
    expert outputs go to a spill folder in ``folder`` as the pass runs (never held for every layer),
    and each layer's spill is removed once ``on_layer`` has written it to its cache file."""
    with spill_folder(folder) if "outputs" in groups else contextlib.nullcontext() as spill:
        try:
            everything = collect(model, tokens(), groups, settings, progress=progress, spill_dir=spill)
        except OSError as err:
            if spill and disk_full(err, spill):
                raise disk_full_error(folder, "the expert outputs of the calibration pass") from err
            raise
        fresh = {}
        for index in list(everything):
            fresh[index] = on_layer(index, everything.pop(index))
            if spill:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(spill_file(spill, index))
        return fresh


def _merge(into: dict, part: dict) -> None:
    for index, named in part.items():
        into.setdefault(int(index), LayerStats()).update(named)
