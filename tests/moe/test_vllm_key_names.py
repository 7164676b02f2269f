"""A pruned checkpoint with one expert count in every MoE layer is written in the family's published format.

The guarantee: whichever of moebench's three writers saves it (`save_sliced`: the source's own tensors sliced;
`save_pruned`: the model pruned in memory; `save_streaming`: one decoder layer at a time), a checkpoint that
keeps the same number of experts in every MoE layer holds exactly the tensor names and shapes that the family's
own published checkpoints of that expert count hold, and its config.json states the count under the family's
own key (`Family.count_key`). vLLM needs this: it reads checkpoints by the published per-expert ("legacy") key
names, not by transformers' fused in-memory layout, and builds every layer with the one expert count of the
config, so a checkpoint in any other naming would not load there.

The reference is what transformers itself writes for that family: a fresh tiny model of the family whose
routed-expert count is the kept count (every other config value the same), saved with ``save_pretrained``
(transformers 5 reverts its fused layout to the checkpoint names on save). The kept experts are a fixed
pseudo-random half of each layer, different per layer (equal per routing group where routing is
group-limited), so that index mix-ups show in the logits: each written checkpoint loads in plain transformers
with no missing or unexpected keys and computes what the source model computes with the same experts.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from tiny_models import sample_ids, tiny_model
from transformers import AutoModelForCausalLM

from moebench.method.registry import resolve_budget, select_top
from moebench.moe.checkpoint import save_pruned
from moebench.moe.families import family_for
from moebench.moe.files import open_shard, weight_map
from moebench.moe.formats import save_sliced
from moebench.moe.layered import LayeredCheckpoint
from moebench.moe.merge import merge
from moebench.moe.ops import mask, prune
from moebench.moe.streaming import save_streaming
from moebench.moe.view import MoEView

WRITERS = ("save_sliced", "save_pruned", "save_streaming")
MERGE_WRITERS = ("save_pruned", "save_streaming")  # merged experts are new weights: save_sliced has none to copy


def stored(folder: str) -> dict[str, tuple[list[int], str]]:
    """Every tensor of a safetensors checkpoint folder: name -> (shape, dtype), read from the headers."""
    found = {}
    for key, file in weight_map(folder).items():
        with open_shard(file) as handle:
            view = handle.get_slice(key)
            found[key] = (list(view.get_shape()), view.get_dtype())
    return found


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """Factory: the tensors (name -> shape, dtype) that transformers writes for ``family`` with ``count`` routed
    experts per MoE layer (a fresh tiny model of the family, saved with save_pretrained)."""
    made = {}

    def get(family: str, count: int) -> dict[str, tuple[list[int], str]]:
        if (family, count) not in made:
            model = tiny_model(family, **{family_for(family).count_key: count})
            assert set(MoEView(model).experts_per_layer.values()) == {count}
            folder = tmp_path_factory.mktemp(f"{family}-{count}e")
            model.save_pretrained(folder)
            made[family, count] = stored(str(folder))
        return made[family, count]

    return get


def pseudo_random_half(view: MoEView, seed: int = 7) -> dict[int, list[int]]:
    """Half of each MoE layer's experts (as `resolve_budget` rounds ratio 0.5, equal per routing group), chosen
    by fixed random scores, different in every layer."""
    budget = resolve_budget(view, ratio=0.5)
    g = torch.Generator().manual_seed(seed)
    keep = {layer.index: select_top(torch.rand(layer.num_experts, generator=g), budget[layer.index], layer.groups)
            for layer in view.layers}
    assert any(ids != list(range(len(ids))) for ids in keep.values())  # not the first half: mix-ups would show
    return keep


def merge_groups(view: MoEView, keep: dict[int, list[int]]) -> dict[int, list[dict]]:
    """Each dropped expert merged into a kept one of its routing group (weighted, router rows averaged)."""
    groups = {}
    for layer in view.layers:
        size = layer.num_experts // (layer.groups[0] if layer.groups else 1)
        kept, out = keep[layer.index], []
        dropped = [e for e in range(layer.num_experts) if e not in kept]
        for start in range(0, layer.num_experts, size):
            into = [e for e in kept if start <= e < start + size]
            rest = [e for e in dropped if start <= e < start + size]
            out += [{"into": a, "experts": [a, b], "weights": [0.6, 0.4], "router": [0.5, 0.5]}
                    for a, b in zip(into, rest, strict=True)]
        groups[layer.index] = out
    return groups


def write(writer: str, source: str, keep: dict[int, list[int]], out: str, groups=None) -> None:
    """Write ``source`` pruned to ``keep`` (merged by ``groups`` first, if given) with one of the writers, as
    `moebench.moe.writers.checkpoint_writer` calls them."""
    if writer == "save_pruned":
        model = AutoModelForCausalLM.from_pretrained(source)
        if groups:
            merge(model, groups)
        else:
            prune(model, keep)
        save_pruned(model, out)
        return
    skeleton = LayeredCheckpoint(source)  # the plan applied to the meta skeleton gives the pruned config
    counts_before = MoEView(skeleton.model).experts_per_layer
    prune(skeleton.model, keep)
    if writer == "save_sliced":
        save_sliced(source, skeleton.model, keep, counts_before, out)
    else:
        save_streaming(LayeredCheckpoint(source), keep, out, skeleton.model.config, merge=groups)


def expected_logits(source: str, keep: dict[int, list[int]], groups=None) -> torch.Tensor:
    """The source model's logits with only the kept experts routable (a routing mask: no writer involved), or
    merged in memory."""
    model = AutoModelForCausalLM.from_pretrained(source).eval()
    if groups:
        merge(model, groups)
    else:
        mask(model, keep)
    with torch.no_grad():
        return model(sample_ids()).logits


def check_published(family: str, out: str, count: int, published) -> None:
    """``out`` holds the family's published names and shapes for ``count`` experts, states the count under the
    family's key, and loads in plain transformers with nothing missing or left over."""
    reference, written = published(family, count), stored(out)
    missing, extra = sorted(set(reference) - set(written)), sorted(set(written) - set(reference))
    assert not missing and not extra, f"{family}: keys missing {missing[:6]}, not published {extra[:6]}"
    shapes = {key: (written[key], reference[key]) for key in reference if written[key] != reference[key]}
    assert not shapes, f"{family}: (written, published) shape and dtype differ: {dict(list(shapes.items())[:6])}"
    with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    assert config[family_for(family).count_key] == count
    assert "moebench_experts_per_layer" not in config
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    assert set(MoEView(model).experts_per_layer.values()) == {count}


def reloaded_logits(out: str) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        return model(sample_ids()).logits


@pytest.mark.parametrize("writer", WRITERS)
def test_a_pruned_checkpoint_has_the_published_key_names(writer, family, saved_models, published, tmp_path):
    source = saved_models(family)
    keep = pseudo_random_half(MoEView(tiny_model(family)))
    out = str(tmp_path / writer)
    write(writer, source, keep, out)
    check_published(family, out, len(next(iter(keep.values()))), published)
    torch.testing.assert_close(reloaded_logits(out), expected_logits(source, keep), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("writer", MERGE_WRITERS)
def test_a_merged_checkpoint_has_the_published_key_names(writer, family, saved_models, published, tmp_path):
    source = saved_models(family)
    view = MoEView(tiny_model(family))
    keep = pseudo_random_half(view)
    groups = merge_groups(view, keep)
    out = str(tmp_path / writer)
    write(writer, source, keep, out, groups)
    check_published(family, out, len(next(iter(keep.values()))), published)
    torch.testing.assert_close(reloaded_logits(out), expected_logits(source, keep, groups), rtol=1e-5, atol=1e-5)
