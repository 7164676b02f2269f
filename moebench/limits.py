"""Sizes beyond any real model, and the check of a plan.json's contents: standard library only, so the commands
that only read results (``grid status``, ``collect``, ``report``) can use them without importing torch."""

from __future__ import annotations

MAX_LAYERS = 4096  # decoder layers a config or plan may name (the largest MoEs have ~100)
MAX_EXPERTS = 1 << 16  # routed experts per layer; expert ids are below this (the largest MoEs have 384)
MAX_WIDTH = 1 << 20  # hidden / intermediate sizes and vocabulary (the largest models: ~300k vocabulary)


def plan_problem(data) -> str | None:
    """What is wrong with the contents of a plan.json, or None: its fields and types, and every kept set a list
    of distinct whole numbers in [0, MAX_EXPERTS) for a layer index in [0, MAX_LAYERS) (so a hand-edited or
    tampered file is refused where it is read, not deep inside a report)."""
    if not isinstance(data, dict):
        return f"holds a {type(data).__name__}, not a plan (a mapping)"
    for name, types in (("method", str), ("kind", str), ("keep", dict)):
        if not isinstance(data.get(name), types):
            return f"{name} is missing or not a {types.__name__} ({str(data.get(name))[:40]!r})"
    if data.get("ratio") is not None and (isinstance(data["ratio"], bool) or not isinstance(data["ratio"], (int, float))
                                          or not 0 <= data["ratio"] <= 1):
        return f"ratio {str(data['ratio'])[:40]!r} is not a number in [0, 1]"
    keep = data["keep"]
    if len(keep) > MAX_LAYERS:
        return f"keep names {len(keep)} layers (at most {MAX_LAYERS})"
    for layer, ids in keep.items():
        if not str(layer).isdigit() or int(layer) >= MAX_LAYERS:
            return f"keep: layer {str(layer)[:20]!r} is not a layer index (a whole number below {MAX_LAYERS})"
        if not isinstance(ids, list) or len(ids) > MAX_EXPERTS:
            return f"keep[{layer}] is not a list of at most {MAX_EXPERTS} expert ids"
        bad = next((e for e in ids if isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < MAX_EXPERTS), None)
        if bad is not None:
            return f"keep[{layer}] holds {str(bad)[:20]!r}, not an expert id (a whole number in [0, {MAX_EXPERTS}))"
        if len(set(ids)) != len(ids):
            return f"keep[{layer}] names an expert twice"
    maps = data.get("expert_map")
    if maps is not None:
        if not isinstance(maps, dict) or len(maps) > MAX_LAYERS:
            return "expert_map is not a mapping of layer indices to lists"
        for layer, ids in maps.items():
            if (not str(layer).isdigit() or not isinstance(ids, list) or len(ids) > MAX_EXPERTS
                    or any(isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < MAX_EXPERTS for e in ids)):
                return f"expert_map[{str(layer)[:20]}] is not a list of merged-expert positions"
    return _novice_problem(data.get("novice"))


def _novice_problem(novice) -> str | None:
    """What is wrong with a plan.json's ``novice`` (MoNE: layer -> {"experts": ids, "vectors": file name}), or None."""
    if novice is None:
        return None
    if not isinstance(novice, dict) or len(novice) > MAX_LAYERS:
        return "novice is not a mapping of layer indices to replaced experts"
    for layer, entry in novice.items():
        ids = entry.get("experts") if isinstance(entry, dict) else None
        good = isinstance(ids, list) and len(ids) <= MAX_EXPERTS and all(
            isinstance(e, int) and not isinstance(e, bool) and 0 <= e < MAX_EXPERTS for e in ids)
        named = isinstance(entry, dict) and isinstance(entry.get("vectors"), str)
        if not str(layer).isdigit() or not good or len(set(ids)) != len(ids) or not named:
            return (f"novice[{str(layer)[:20]}] is not {{\"experts\": distinct expert ids, \"vectors\": the name of "
                    "the file beside plan.json}")
    return None
