"""Merging experts: write each group's merged tensors into one expert, then drop the rest of the group.

A *merge* maps an MoE decoder-layer index to its groups. A group is plain data::

    {"into": 3, "experts": [3, 5, 6], "weights": [0.5, 0.3, 0.2],
     "router": [1.0, 0.0, 0.0],          # optional; default: one-hot on `into`
     "perms": [None, [...], None],       # optional; per member, a permutation of its intermediate units
     "svd": {"split": "reshape", "rank": 0}}  # optional; a subspace merge instead (`moebench.moe.subspace`)

For every per-expert tensor T (``gate_up_proj``, ``down_proj``, biases) the expert ``into`` becomes

    T_into <- sum_i weights[i] * P_i(T_experts[i])

where P_i reorders member i's intermediate units (rows of gate and up, columns of down) by
``perms[i]`` (identity when absent). Every per-expert router tensor (weight row, bias,
score-correction bias) of ``into`` becomes ``sum_i router[i] * row_i`` (unchanged by default). Then
the layer keeps exactly the ``into`` experts (`moebench.moe.ops.prune`): experts in no group are
dropped, so a group of one is pruning, and a merged model is an ordinary pruned-size checkpoint.
A group with ``svd`` is merged by a joint SVD of its members' weights instead of the average
(Sub-MoE, `moebench.moe.subspace.merge_group`); it takes no ``perms``. Permuting an expert's intermediate
units never changes what it computes; the layout (transposed,
gate/up interleaved as on GPT-OSS, biases) is read from the experts module and the family row.

With an *expert map* (``expert_map[layer]``: ``[E]``, each expert's group's position among the sorted
``into`` ids; the form of the authors' code, ``router=all`` of `hc_smoe` / `m_smoe`) the router keeps all
its E rows unchanged and only the experts are cut to the ``into`` experts; every router slot then dispatches
to its group's merged expert (`moebench.moe.expert_map`). Every expert must then be in a group, and groups
carry no ``router`` coefficients.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from moebench.moe.kernels import is_transposed
from moebench.moe.ops import _check_layer, _replace_tensor, prune
from moebench.moe.subspace import SPLITS, merge_group
from moebench.moe.view import MoEError, MoELayer, MoEView

Merge = Mapping[int, list[dict]]
_TOLERANCE = 1e-6


def normalise_group(group: Mapping) -> dict:
    """A group with int ids and float coefficients (``router`` / ``perms`` only when given)."""
    out = {"into": int(group["into"]), "experts": [int(i) for i in group["experts"]],
           "weights": [float(w) for w in group["weights"]]}
    if group.get("router") is not None:
        out["router"] = [float(r) for r in group["router"]]
    if group.get("perms") is not None:
        out["perms"] = [None if p is None else [int(i) for i in p] for p in group["perms"]]
    if group.get("svd") is not None:
        out["svd"] = {"split": str(group["svd"]["split"]), "rank": int(group["svd"]["rank"])}
    return out


def intermediate_size(layer: MoELayer) -> int:
    """Intermediate units per expert of ``layer`` (the axis weight matching permutes)."""
    down = layer.expert_tensors()["down_proj"]
    return int(down.shape[1] if is_transposed(layer.experts) else down.shape[2])


def _unit_axes(layer: MoELayer) -> dict[str, tuple[int | None, str]]:
    """Per-expert tensor name -> (intermediate axis of one expert's tensor or None, ``gate_up`` | ``down``)."""
    t = is_transposed(layer.experts)
    known = {"gate_up_proj": (1 if t else 0, "gate_up"), "gate_up_proj_bias": (0, "gate_up"),
             "down_proj": (0 if t else 1, "down"), "down_proj_bias": (None, "down")}
    unknown = sorted(set(layer.expert_tensors()) - set(known))
    if unknown:
        raise MoEError(f"layer {layer.index}: expert tensors {unknown} have no known intermediate axis; "
                       "permutation alignment cannot be applied to this family (merge without alignment)")
    return {name: known[name] for name in layer.expert_tensors()}


def _unit_index(layer: MoELayer, kind: str, perm: torch.Tensor) -> torch.Tensor:
    """Positions along a tensor's intermediate axis that permutation ``perm [I]`` of the units selects."""
    if kind == "down":
        return perm
    if layer.family.gate_up_interleaved:
        return torch.stack((2 * perm, 2 * perm + 1), dim=1).reshape(-1)
    return torch.cat((perm, perm + perm.numel()))


def permuted(layer: MoELayer, e: int, perm: list[int] | None) -> dict[str, torch.Tensor]:
    """Expert ``e``'s tensors with its intermediate units reordered: unit j of the result is unit perm[j]."""
    tensors = {name: t[e] for name, t in layer.expert_tensors().items()}
    if perm is None:
        return tensors
    p = torch.as_tensor(perm, dtype=torch.long)
    out = {}
    for name, (axis, kind) in _unit_axes(layer).items():
        t = tensors[name]
        out[name] = t if axis is None else t.index_select(axis, _unit_index(layer, kind, p).to(t.device))
    return out


def unit_features(layer: MoELayer, e: int) -> torch.Tensor:
    """``[I, D]``: per intermediate unit of expert ``e``, its gate and up weights (and biases) and its
    down-projection column, concatenated (what weight matching compares)."""
    parts, size = [], intermediate_size(layer)
    for name, (axis, kind) in _unit_axes(layer).items():
        if axis is None:
            continue
        t = layer.expert_tensors()[name][e].float().movedim(axis, 0)  # [units along the axis, rest]
        t = t.reshape(t.shape[0], -1)
        if kind == "gate_up":  # [2I, D] -> [I, 2D]: gate and up of each unit side by side
            gate, up = (t[0::2], t[1::2]) if layer.family.gate_up_interleaved else (t[:size], t[size:])
            t = torch.cat((gate, up), dim=1)
        parts.append(t)
    return torch.cat(parts, dim=1)


def match_units(layer: MoELayer, reference: int, other: int) -> list[int]:
    """The permutation of ``other``'s intermediate units that best matches ``reference``'s weights.

    Weight matching (linear assignment): maximise sum_j <F_ref[j], F_other[perm[j]]> over
    permutations, F the `unit_features`; equivalently minimise the squared distance of the weights.
    """
    from scipy.optimize import linear_sum_assignment

    with torch.no_grad():
        cost = unit_features(layer, reference) @ unit_features(layer, other).T
    rows, cols = linear_sum_assignment(cost.double().cpu().numpy(), maximize=True)
    return [int(c) for _, c in sorted(zip(rows, cols, strict=True))]


def validate_merge(view: MoEView, merge: Merge, expert_map: Mapping | None = None,
                   ) -> tuple[dict[int, list[dict]], dict[int, list[int]]]:
    """Check a merge against the model; returns it normalised and the kept experts (the ``into`` ids).

    Raises `MoEError` naming every problem: unknown layers, ids out of range or in two groups,
    ``into`` outside its group, coefficient lists of the wrong length or not summing to one,
    permutations of the wrong size, groups spanning routing groups, and kept sets that the router
    cannot use (fewer than ``top_k``, unequal per routing group); with ``expert_map``, maps that are
    not the groups' (see the module docstring) and layers merged before.
    """
    problems, normal, keep = [], {}, {}
    by_index = {layer.index: layer for layer in view.layers}
    for key, groups in merge.items():
        layer = by_index.get(int(key))
        if layer is None:
            problems.append(f"layer {key}: not an MoE layer (MoE layers: {sorted(by_index)})")
            continue
        groups = [normalise_group(g) for g in groups]
        problems += _check_groups(layer, groups)
        normal[layer.index] = groups
        keep[layer.index] = sorted(g["into"] for g in groups)
        if not problems:
            problems += _check_layer(layer, keep[layer.index])
        if layer.expert_map is not None:
            problems.append(f"layer {layer.index}: its experts were merged already (all router rows kept); merge the "
                            "unmerged model")
    if expert_map is not None and not problems:
        problems += _check_maps(view, normal, expert_map)
    if problems:
        raise MoEError("invalid expert merge:\n  " + "\n  ".join(problems))
    return normal, keep


def _check_maps(view: MoEView, groups: dict[int, list[dict]], maps: Mapping) -> list[str]:
    """Problems with the expert maps of a merge that keeps every router row (empty when fine)."""
    from moebench.moe.expert_map import map_from_groups

    problems = []
    for key in sorted(set(map(int, maps)) ^ set(groups)):
        problems.append(f"layer {key}: an expert map needs the layer's merge groups and the groups their map")
    for index in sorted(set(map(int, maps)) & set(groups)):
        layer, given = view.layer(index), [int(e) for e in maps.get(index, maps.get(str(index)))]
        expected = map_from_groups(groups[index], layer.num_experts)
        where = f"layer {index}"
        if -1 in expected:
            alone = [e for e, m in enumerate(expected) if m < 0]
            problems.append(f"{where}: experts {alone} are in no group; with all router rows kept the router could "
                            "still choose them")
        elif given != expected:
            problems.append(f"{where}: expert map {given[:16]} is not its groups' {expected[:16]} (each expert: "
                            "the position of its group's `into` among the sorted `into` ids)")
        if any(g.get("router") is not None for g in groups[index]):
            problems.append(f"{where}: groups carry router coefficients, but a merge that keeps every router row "
                            "leaves the router unchanged")
    return problems


def _check_groups(layer: MoELayer, groups: list[dict]) -> list[str]:
    """Problems with one layer's groups (empty when fine)."""
    n, where, problems, seen = layer.num_experts, f"layer {layer.index}", [], set()
    size = n // layer.groups[0] if layer.groups else n
    units = intermediate_size(layer)
    for g in groups:
        ids, name = g["experts"], f"{where} group into {g['into']}"
        bad = sorted({i for i in ids if not 0 <= i < n} | ({g["into"]} - set(range(n))))
        if bad:
            problems.append(f"{name}: expert ids {bad} out of range 0..{n - 1}")
            continue
        twice = sorted(set(ids) & seen | {i for i in ids if ids.count(i) > 1})
        if twice:
            problems.append(f"{name}: experts {twice} are in more than one group")
        seen |= set(ids)
        if g["into"] not in ids:
            problems.append(f"{name}: `into` must be one of its experts {ids}")
        for field in ("weights", "router"):
            values = g.get(field)
            if values is not None and (len(values) != len(ids) or not all(math.isfinite(v) for v in values)
                                       or abs(sum(values) - 1.0) > _TOLERANCE):
                problems.append(f"{name}: {field} {values} must be {len(ids)} finite numbers summing to 1")
        for perm in g.get("perms") or []:
            if perm is not None and sorted(perm) != list(range(units)):
                problems.append(f"{name}: a permutation must reorder all {units} intermediate units")
                break
        svd = g.get("svd")
        if svd is not None and (svd["split"] not in SPLITS or svd["rank"] < 0 or g.get("perms") is not None):
            problems.append(f"{name}: svd {svd} needs split in {SPLITS}, rank >= 0 (0: all) and no perms")
        if len({i // size for i in ids}) > 1:
            problems.append(f"{name}: experts {ids} span routing groups of {size}; group-limited routing "
                            "needs each merge group inside one routing group")
    return problems


def merge(model: nn.Module, groups: Merge, expert_map: Mapping | None = None) -> dict[int, list[int]]:
    """Merge experts in place: each group's merged tensors and router rows go into its ``into`` expert,
    then the layer keeps only those experts. Returns the kept experts per layer.

    ``expert_map`` (per layer ``[E]``): the router keeps all its rows, unchanged, and each slot dispatches to
    its group's merged expert (`moebench.moe.expert_map`); the experts module holds the merged experts only.
    """
    view = MoEView(model)
    groups, keep = validate_merge(view, groups, expert_map)
    with torch.no_grad():
        for index, layer_groups in groups.items():
            layer = view.layer(index)
            for g in layer_groups:
                _merge_group(layer, g)
    if expert_map is None:
        prune(model, keep)
    else:
        from moebench.moe.expert_map import share

        share(model, keep, {int(k): [int(e) for e in v] for k, v in expert_map.items()})
    return keep


def _merge_group(layer: MoELayer, g: dict) -> None:
    """Write one group's weighted (aligned) average into its ``into`` expert and router row."""
    if g["experts"] == [g["into"]]:
        return
    if g.get("svd") is not None:
        merge_group(layer, g)
        return
    perms = g.get("perms") or [None] * len(g["experts"])
    tensors = layer.expert_tensors()
    total = {name: torch.zeros_like(t[0], dtype=torch.float64) for name, t in tensors.items()}
    for e, w, perm in zip(g["experts"], g["weights"], perms, strict=True):
        for name, t in permuted(layer, e, perm).items():
            total[name] += w * t.double()
    for name, t in tensors.items():
        t.data[g["into"]] = total[name].to(t.dtype)
    router = g.get("router")
    if router is None or router == [float(e == g["into"]) for e in g["experts"]]:
        return
    for name, (t, dim) in layer.router_tensors().items():
        rows = t.data.movedim(dim, 0)
        mixed = sum(r * rows[e].double() for e, r in zip(g["experts"], router, strict=True))
        new = rows.clone()
        new[g["into"]] = mixed.to(t.dtype)
        _replace_tensor(layer.router, name, new.movedim(0, dim))
