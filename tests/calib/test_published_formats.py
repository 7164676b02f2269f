"""Checkpoints in the formats large MoEs are published in (FP8 blocks + MTP, MXFP4, bf16 + MTP), on both paths.

Each format is a tiny random checkpoint written in the published on-disk layout (`published_formats`).
For each: the statistics of the layer-by-layer path equal those of ``from_pretrained``'s dequantized
model; `moebench prune` with and without ``--sequential`` keeps the same experts, writes the source's
format (smaller than the source), and the result loads in plain transformers with logits equal to
the dequantized model pruned in memory.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import build_tokenizer
from published_formats import write_fp8_deepseek, write_mxfp4_gpt_oss
from test_sequential import SETTINGS, TOKENS, assert_same
from transformers import AutoModelForCausalLM

from moebench.calib.cache import model_fingerprint
from moebench.calib.sequential import collect_sequential
from moebench.calib.stats import GROUPS, collect
from moebench.cli import main
from moebench.moe.checkpoint import load_model, sequential_needed
from moebench.moe.formats import disk_bytes
from moebench.moe.layered import LayeredCheckpoint
from moebench.moe.ops import prune

WRITERS = {"fp8_mtp": lambda d: write_fp8_deepseek(d), "mxfp4": write_mxfp4_gpt_oss,
           "bf16_mtp": lambda d: write_fp8_deepseek(d, fp8=False)}
FORMAT_LINE = {"fp8_mtp": "FP8 e4m3, 128x128 blocks", "mxfp4": "MXFP4 experts", "bf16_mtp": "bfloat16"}


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    made = {}

    def get(kind: str) -> str:
        if kind not in made:
            folder = str(tmp_path_factory.mktemp(kind))
            WRITERS[kind](folder)
            build_tokenizer().save_pretrained(folder)
            made[kind] = folder
        return made[kind]

    return get


def _json(*parts) -> dict:
    with open(os.path.join(*parts), encoding="utf-8") as f:
        return json.load(f)


def _text(*parts) -> str:
    with open(os.path.join(*parts), encoding="utf-8") as f:
        return f.read()


def _keys(folder: str) -> dict[str, list[int]]:
    from safetensors import safe_open

    with open(os.path.join(folder, "model.safetensors.index.json"), encoding="utf-8") as f:
        weight_map = json.load(f)["weight_map"]
    shapes = {}
    for key, shard in weight_map.items():
        with safe_open(os.path.join(folder, shard), framework="pt") as f:
            shapes[key] = list(f.get_slice(key).get_shape())
    return shapes


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_statistics_equal_on_both_paths(kind, published):
    folder = published(kind)
    model = load_model(folder)  # transformers dequantizes on a CPU
    full = collect(model, TOKENS, GROUPS, SETTINGS, progress=False)
    layered = LayeredCheckpoint(folder)  # one layer at a time, dequantized by transformers' quantizer
    assert len(layered.mtp_keys) == (1 if kind.endswith("mtp") else 0)
    seq = collect_sequential(layered, TOKENS, GROUPS, SETTINGS, progress=False)
    assert_same(full, seq)
    assert model_fingerprint(layered.model) == model_fingerprint(model)


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_prune_keeps_the_format_on_both_paths(kind, published, corpus, tmp_path, capsys):
    source = published(kind)
    outs = {}
    for path in ("--sequential", "--no-sequential"):
        out = str(tmp_path / path.strip("-"))
        code = main(["prune", source, "--method", "reap", "--ratio", "0.5", "--calib", f"file:{corpus}",
                     "--samples", "4", "--seq-len", "16", "--stats-dir", str(tmp_path / f"stats{path}"),
                     "--device", "cpu", path, "--out", out])
        assert code == 0
        outs[path] = out
    printed = capsys.readouterr().out
    assert f"checkpoint on disk: {FORMAT_LINE[kind]}" in printed
    plans = [_json(o, "plan.json")["keep"] for o in outs.values()]
    assert plans[0] == plans[1]  # the same experts kept on both paths
    keep = {int(i): ids for i, ids in plans[0].items()}

    reference = AutoModelForCausalLM.from_pretrained(source)  # dequantized, pruned in memory
    prune(reference, keep)
    ids = torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(0))
    expected = reference(ids).logits
    src_config = _json(source, "config.json")
    src_keys = _keys(source)
    for out in outs.values():
        config = _json(out, "config.json")
        assert config.get("quantization_config") == src_config.get("quantization_config")
        assert disk_bytes(out) < disk_bytes(source)
        pruned = AutoModelForCausalLM.from_pretrained(out)
        assert (pruned(ids).logits - expected).abs().max().item() == 0.0  # the same stored values, sliced
        keys = _keys(out)
        # every non-expert tensor is stored as in the source (dtype and shape), scales included
        assert {k for k in src_keys if "experts." not in k or "shared" in k} <= set(keys)
        card = _text(out, "README.md")
        assert f"Format on disk: {FORMAT_LINE[kind]}" in card and "the source's own format" in card
    if kind.endswith("mtp"):  # the MTP layer: pruned like the last MoE layer, one expert count in the file
        n = src_config["num_hidden_layers"]
        for out in outs.values():
            keys = _keys(out)
            mtp_experts = {int(k.split(".experts.")[1].split(".")[0]) for k in keys
                           if k.startswith(f"model.layers.{n}.mlp.experts.")}
            assert mtp_experts == set(range(4))
            assert keys[f"model.layers.{n}.mlp.gate.weight"][0] == 4
            assert keys[f"model.layers.{n}.mlp.gate.e_score_correction_bias"] == [4]
            assert f"model.layers.{n}.eh_proj.weight" in keys
            config = _json(out, "config.json")
            assert config["n_routed_experts"] == 4 and config["num_nextn_predict_layers"] == 1
            assert config["moebench"]["mtp_kept_experts"] == {str(n): keep[max(keep)]}
    if kind == "fp8_mtp":  # kept experts' FP8 tensors and their block scales are the source's, renumbered
        from safetensors import safe_open

        def tensor(folder, key):
            index = _json(folder, "model.safetensors.index.json")
            with safe_open(os.path.join(folder, index["weight_map"][key]), framework="pt") as f:
                return f.get_tensor(key)

        out = outs["--sequential"]
        old = keep[1][2]
        for suffix in ("weight", "weight_scale_inv"):
            a = tensor(source, f"model.layers.1.mlp.experts.{old}.down_proj.{suffix}")
            b = tensor(out, f"model.layers.1.mlp.experts.2.down_proj.{suffix}")
            assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8) if a.dtype.itemsize == 1 else a,
                                                      b.view(torch.uint8) if b.dtype.itemsize == 1 else b)
        assert tensor(out, "model.layers.1.mlp.experts.0.down_proj.weight").dtype == torch.float8_e4m3fn


def test_save_dtype_bf16_dequantizes_on_purpose(published, corpus, tmp_path):
    source = published("fp8_mtp")
    out = str(tmp_path / "bf16")
    assert main(["prune", source, "--method", "frequency", "--ratio", "0.5", "--calib", f"file:{corpus}",
                 "--samples", "4", "--seq-len", "16", "--stats-dir", str(tmp_path / "stats"), "--device", "cpu",
                 "--save-dtype", "bf16", "--out", out]) == 0
    config = _json(out, "config.json")
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    keys = _keys(out)
    assert not [k for k in keys if k.endswith("_scale_inv")]
    keep = {int(i): ids for i, ids in _json(out, "plan.json")["keep"].items()}
    reference = AutoModelForCausalLM.from_pretrained(source)
    prune(reference, keep)
    ids = torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(0))
    pruned = AutoModelForCausalLM.from_pretrained(out)
    assert all(p.dtype != torch.float8_e4m3fn for p in pruned.parameters())
    # transformers' own dequantization, written to disk: the same bf16 values as dequantized at load
    assert (pruned(ids).logits - reference(ids).logits).abs().max().item() == 0.0
    card = _text(out, "README.md")
    assert "written dequantized on purpose (the source is FP8 e4m3, 128x128 blocks)" in card


def test_merging_a_quantized_checkpoint_is_refused_before_calibrating(published, corpus, tmp_path, capsys):
    source = published("mxfp4")
    assert main(["prune", source, "--method", "hc_smoe", "--ratio", "0.5", "--calib", f"file:{corpus}",
                 "--samples", "4", "--seq-len", "16", "--stats-dir", str(tmp_path / "stats"), "--device", "cpu",
                 "--out", str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err
    assert "merges experts" in err and "--save-dtype bf16" in err
    assert not os.path.exists(tmp_path / "stats")  # refused before any calibration
    out = str(tmp_path / "merged-bf16")
    assert main(["prune", source, "--method", "hc_smoe", "--ratio", "0.5", "--calib", f"file:{corpus}",
                 "--samples", "4", "--seq-len", "16", "--stats-dir", str(tmp_path / "stats"), "--device", "cpu",
                 "--save-dtype", "bf16", "--out", out, "--param", "router=dominant"]) == 0
    config = _json(out, "config.json")
    assert "quantization_config" not in config and config["num_local_experts"] == 4
    AutoModelForCausalLM.from_pretrained(out)(torch.tensor([[3, 4, 5]]))


def test_mtp_checkpoint_refuses_merging(published, corpus, tmp_path, capsys):
    assert main(["prune", published("bf16_mtp"), "--method", "hc_smoe", "--ratio", "0.5", "--calib",
                 f"file:{corpus}", "--samples", "4", "--seq-len", "16", "--device", "cpu",
                 "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "MTP layer" in err and "--ratio or --keep" in err and not os.path.exists(tmp_path / "m")


def test_quantized_size_counts_its_dequantized_growth(published, monkeypatch):
    """On a CPU transformers dequantizes FP8 to bf16: the sequential default compares the grown size."""
    import moebench.moe.checkpoint as checkpoint

    source = published("fp8_mtp")
    size = disk_bytes(source)
    monkeypatch.setattr(checkpoint, "free_bytes", lambda device: int(size * 1.5))  # fits as stored, not as loaded
    why = sequential_needed(source, "cpu")
    assert why is not None and "2.0x once dequantized" in why
    monkeypatch.setattr(checkpoint, "free_bytes", lambda device: int(size * 2.5))
    assert sequential_needed(source, "cpu") is None


def test_inspect_reports_the_format_on_disk(published, capsys):
    assert main(["inspect", published("fp8_mtp")]) == 0
    out = capsys.readouterr().out
    assert "FP8 e4m3, 128x128 blocks" in out and "MTP layers" in out and "on disk" in out


def test_experts_kept_quantized_in_memory_are_refused_with_the_fix():
    """On a GPU of compute capability >= 8.9 transformers keeps FP8 experts (``FP8Experts``); simulated here by
    transformers' own module replacement, the statistics pass names the layer and points at --sequential."""
    from published_formats import fp8_deepseek_config
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import replace_with_fp8_linear

    from moebench.moe.view import MoEError

    model = AutoModelForCausalLM.from_config(fp8_deepseek_config(mtp=False))
    plain = collect(model, TOKENS, ["routing"], SETTINGS, progress=False)  # full precision: observed
    assert sorted(plain) == [1, 2]
    model = replace_with_fp8_linear(model, modules_to_not_convert=["lm_head"], pre_quantized=True,
                                    quantization_config=FineGrainedFP8Config(weight_block_size=[128, 128]))
    with pytest.raises(MoEError, match=r"FP8Experts in MoE layer 1 .*--sequential"):
        collect(model, TOKENS, ["routing"], SETTINGS, progress=False)


REMOTE_CONFIG = '''from transformers import Qwen3MoeConfig


class RemoteMoeConfig(Qwen3MoeConfig):
    pass
'''
REMOTE_MODEL = '''from transformers import Qwen3MoeForCausalLM

from .configuration_remote import RemoteMoeConfig


class RemoteMoeForCausalLM(Qwen3MoeForCausalLM):
    config_class = RemoteMoeConfig
    from_remote_code = True
'''


@pytest.fixture
def remote_code_model(saved_models, tmp_path):
    """A checkpoint whose config.json maps to model code in its own folder (``auto_map``), as hub repositories do."""
    import shutil

    folder = tmp_path / "remote"
    shutil.copytree(saved_models("qwen3_moe"), folder)
    (folder / "configuration_remote.py").write_text(REMOTE_CONFIG)
    (folder / "modeling_remote.py").write_text(REMOTE_MODEL)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_remote.RemoteMoeConfig",
                          "AutoModelForCausalLM": "modeling_remote.RemoteMoeForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


@pytest.mark.parametrize("path", ["--sequential", "--no-sequential"])
def test_trust_remote_code_reaches_the_loader(path, remote_code_model, corpus, tmp_path, monkeypatch):
    """Off by default (transformers' own class is used); with --trust-remote-code the folder's code builds the model."""
    import moebench.method.pipeline as pipeline

    built = []
    real = pipeline.prepare

    def spy(model, tokenizer, request):
        built.append(type(model).__name__)
        return real(model, tokenizer, request)

    monkeypatch.setattr("moebench.cli.prune.prepare", spy)
    for flag in ([], ["--trust-remote-code"]):
        out = str(tmp_path / f"out{len(flag)}")
        assert main(["prune", remote_code_model, "--method", "frequency", "--ratio", "0.5", "--calib",
                     f"file:{corpus}", "--samples", "4", "--seq-len", "16", "--device", "cpu", path,
                     "--stats-dir", str(tmp_path / "stats"), "--out", out, *flag]) == 0
    assert built == ["Qwen3MoeForCausalLM", "RemoteMoeForCausalLM"]


def test_kimi_k2_style_config_is_built_as_transformers_deepseek_v3(published, corpus, tmp_path, capsys):
    """Kimi-K2 publishes DeepSeek-V3's architecture under model_type kimi_k2 with its own (4.x-style) code; without
    --trust-remote-code moebench builds transformers' DeepseekV3 from ``architectures`` and prunes it, FP8 kept."""
    import shutil

    kimi = tmp_path / "kimi"
    shutil.copytree(published("fp8_mtp"), kimi)
    config = json.loads((kimi / "config.json").read_text())
    config.update(model_type="kimi_k2", architectures=["DeepseekV3ForCausalLM"],
                  auto_map={"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                            "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"})
    (kimi / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError):  # transformers alone does not know it
        AutoModelForCausalLM.from_pretrained(str(kimi))
    assert main(["inspect", str(kimi)]) == 0
    assert "DeepSeek-V3 (model_type deepseek_v3)" in capsys.readouterr().out
    outs = []
    for path in ("--sequential", "--no-sequential"):
        out = tmp_path / f"out{path}"
        assert main(["prune", str(kimi), "--method", "frequency", "--ratio", "0.5", "--calib", f"file:{corpus}",
                     "--samples", "4", "--seq-len", "16", "--device", "cpu", path, "--stats-dir",
                     str(tmp_path / f"stats{path}"), "--out", str(out)]) == 0
        written = json.loads((out / "config.json").read_text())
        assert written["model_type"] == "kimi_k2" and written["quantization_config"]["quant_method"] == "fp8"
        outs.append(json.loads((out / "plan.json").read_text())["keep"])
    assert outs[0] == outs[1]
    ids = torch.tensor([[3, 4, 5, 6]])
    reference = load_model(published("fp8_mtp"))
    prune(reference, {int(i): v for i, v in outs[0].items()})
    assert torch.equal(load_model(str(tmp_path / "out--sequential"))(ids).logits, reference(ids).logits)


@pytest.mark.parametrize("save_dtype", [None, "bf16"])
def test_lm_eval_sequential_writes_the_source_format_or_save_dtype(save_dtype, published, corpus, tmp_path):
    """lm-eval's ``pruned_moe`` with ``sequential=true``: the pruned checkpoint it writes and then evaluates is FP8
    like its source, or bf16 with ``save_dtype=bf16``; the model lm-eval loads from it runs."""
    from moebench.eval.model import PrunedMoELM

    args = {"method": "frequency", "ratio": "0.5", "calib": f"file:{corpus}", "calib_samples": "4",
            "calib_seq_len": "16", "stats_dir": str(tmp_path / "cache" / "stats"), "sequential": "true",
            "device": "cpu", "batch_size": 1}
    if save_dtype:
        args["save_dtype"] = save_dtype
    lm = PrunedMoELM(published("fp8_mtp"), **args)
    (folder,) = (tmp_path / "cache" / "pruned").iterdir()
    config = json.loads((folder / "config.json").read_text())
    assert ("quantization_config" in config) == (save_dtype is None)
    assert config["n_routed_experts"] == 4
    assert any(k.startswith("model.layers.3.mlp.experts.3.") for k in _keys(str(folder)))  # the MTP layer kept
    logits = lm.model(torch.tensor([[3, 4, 5]])).logits
    assert torch.isfinite(logits).all()


def test_save_dtype_without_sequential_is_refused():
    from moebench.eval.args import PrunedMoESettings

    with pytest.raises(ValueError, match=r"save_dtype=bf16 .* sequential=true"):
        PrunedMoESettings.from_args({"method": "frequency", "ratio": "0.5", "calib": "c4", "save_dtype": "bf16"}, {})
    with pytest.raises(ValueError, match="save dtype 'int4' is not one of"):
        PrunedMoESettings.from_args({"method": "frequency", "ratio": "0.5", "calib": "c4", "sequential": "true",
                                     "save_dtype": "int4"}, {})


def test_calibration_on_a_device_that_keeps_fp8_goes_layer_by_layer(published, corpus, tmp_path, monkeypatch,
                                                                    caplog):
    """Where transformers would keep FP8 weights quantized (a GPU of compute capability >= 8.9, simulated: the
    quantizer reports it keeps them), prune calibrates layer by layer, dequantizing each layer, by default."""
    import logging

    import moebench.moe.formats as formats

    monkeypatch.setattr(formats, "memory_growth", lambda config, device: 1.0)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        assert main(["prune", published("fp8_mtp"), "--method", "frequency", "--ratio", "0.5", "--calib",
                     f"file:{corpus}", "--samples", "4", "--seq-len", "16", "--device", "cpu",
                     "--stats-dir", str(tmp_path / "stats"), "--out", str(out)]) == 0
    assert "keeps its FP8 e4m3, 128x128 blocks weights quantized" in caplog.text
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"


def test_a_checkpoint_without_safetensors_is_written_from_memory(tmp_path, corpus, capsys):
    """PyTorch ``.bin`` weights cannot be read tensor by tensor: the pruned model in memory is saved instead."""
    from safetensors.torch import load_file
    from tiny_models import tiny_model

    source = tmp_path / "bin"
    tiny_model("qwen3_moe").save_pretrained(source)
    torch.save(load_file(source / "model.safetensors"), source / "pytorch_model.bin")  # as older repositories ship
    (source / "model.safetensors").unlink()
    build_tokenizer().save_pretrained(source)
    assert not [f for f in os.listdir(source) if f.endswith(".safetensors")]
    out = tmp_path / "out"
    assert main(["prune", str(source), "--method", "frequency", "--ratio", "0.5", "--calib", f"file:{corpus}",
                 "--samples", "4", "--seq-len", "16", "--device", "cpu", "--no-sequential", "--stats-dir",
                 str(tmp_path / "stats"), "--out", str(out)]) == 0
    assert "checkpoint on disk: float32" in capsys.readouterr().out
    AutoModelForCausalLM.from_pretrained(out)(torch.tensor([[3, 4, 5]]))


def test_fp8_weights_ending_in_a_partial_block_are_dequantized_block_by_block(published):
    """transformers 5.25 takes rows / scale rows as the block height: 96 for a 192-row weight with 2 block rows
    (DeepSeek-V3's 576-row kv_a_proj_with_mqa is refused outright). moebench's fix scales each 128 x 128 block by
    its own scale, on both paths."""
    from safetensors import safe_open

    from moebench.moe.formats import ragged_dequantize

    source = published("fp8_mtp")
    key = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"
    index = _json(source, "model.safetensors.index.json")
    with safe_open(os.path.join(source, index["weight_map"][key]), framework="pt") as f:
        q = f.get_tensor(key)
    with safe_open(os.path.join(source, index["weight_map"][key + "_scale_inv"]), framework="pt") as f:
        s = f.get_tensor(key + "_scale_inv")
    assert q.shape == (192, 256) and s.shape == (2, 2)  # the last block row holds 64 rows
    expected = q.float().clone()
    for i in range(2):
        for j in range(2):
            expected[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] *= s[i, j]
    expected = expected.to(torch.bfloat16)
    assert torch.equal(ragged_dequantize(q, s, (128, 128), torch.bfloat16), expected)
    loaded = load_model(source).model.layers[1].self_attn.kv_a_proj_with_mqa.weight
    assert torch.equal(loaded.detach(), expected)
    layered = LayeredCheckpoint(source)
    layer = layered.materialise(1)
    assert torch.equal(layer.self_attn.kv_a_proj_with_mqa.weight.detach(), expected)
