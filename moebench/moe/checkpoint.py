"""Loading and saving (pruned) MoE checkpoints.

A checkpoint pruned to the same expert count in every layer is an ordinary transformers
checkpoint: `save_pruned` writes it in the family's original format and plain
``AutoModelForCausalLM.from_pretrained`` loads it. With different counts per layer, transformers
cannot build the model from its config (one count per model), so `save_pruned` writes the fused
tensors as they are plus ``moebench_experts_per_layer`` in config.json, warns, and only
`load_model` can load it back: it builds the model with the largest count, cuts each layer to
its own count, then loads the tensors. Checkpoints with novice experts (MoNE, `moebench.moe.novice`) load
the same way, their constants attached from ``novices.safetensors``.

A merged model that keeps every router row (``router=all`` of `hc_smoe` / `m_smoe`,
`moebench.moe.expert_map`) is saved in one of two layouts: ``compact`` (default) writes the merged
experts only, the config's expert count E (the router's rows) and the member -> merged-expert maps
under ``moebench_expert_map``, with a warning: only `load_model` reads it (plain transformers refuses it,
the experts' shapes not matching the config); ``duplicated`` writes E experts, each slot a copy of its
merged expert, a plain checkpoint that transformers and vLLM load (no memory saved).

`sequential_needed` says whether a checkpoint's weights exceed a device's free memory, the
default for working one decoder layer at a time (`moebench.moe.layered`).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import warnings
from collections.abc import Callable
from contextlib import contextmanager

import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME

from moebench.limits import MAX_EXPERTS, MAX_LAYERS, MAX_WIDTH
from moebench.moe.ops import _prune_layer
from moebench.moe.view import MoEView
from moebench.util import atomic_folder, hub_unreachable, load_plugins, on_terminal

log = logging.getLogger(__name__)

PER_LAYER_KEY = "moebench_experts_per_layer"


class NonUniformCheckpointWarning(UserWarning):
    """Saved a checkpoint with per-layer expert counts, which plain transformers cannot load."""


class ExpertMapCheckpointWarning(UserWarning):
    """Saved a merged checkpoint in the compact layout (all router rows, merged experts once, an expert map),
    which only moebench loads."""


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


@contextmanager
def loading_bars(quiet: bool = False):
    """transformers' per-tensor bars (``Loading weights``, ``Writing model shards``) on a terminal only.

    With stderr redirected to a file (or ``quiet``: one layer's loading inside a longer pass, which
    has its own bar) they are switched off for the duration and on again after.
    """
    from transformers.utils import logging as hf_logging

    if (on_terminal() and not quiet) or not hf_logging.is_progress_bar_enabled():
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


class HubUnreachable(OSError):
    """A hub id whose config.json is neither in the local cache nor reachable on the Hub now."""


def check_hub_config(repo_id: str, revision: str | None = None, config_only: bool = False) -> None:
    """Fail at once, saying what to do, when ``repo_id``'s config.json is neither cached nor reachable on the Hub.

    huggingface_hub retries an unreachable Hub for about half a minute when nothing is cached;
    that helps a flaky connection and costs a machine without one its time. A cached config.json
    passes at once (transformers then falls back to the cache after one try); otherwise one HEAD
    request without retries, under the Hub's own timeout (``HF_HUB_ETAG_TIMEOUT``), decides. An
    answer from the Hub (a missing or gated repository, say) is left for transformers to explain.
    ``config_only``: the caller reads config.json alone (`load_structure`), and the message says so.
    """
    import huggingface_hub

    if isinstance(huggingface_hub.try_to_load_from_cache(repo_id, "config.json", revision=revision), str):
        return
    why = hub_unreachable(repo_id, "config.json", revision)
    if why is not None:
        raise HubUnreachable(_hub_help(repo_id, why, config_only))


def _hub_help(repo_id: str, why: str, config_only: bool) -> str:
    from huggingface_hub.constants import HF_HUB_CACHE

    hint = "" if "/" in repo_id else " (it is no testbed model either: `moebench zoo list` names those)"
    needs = ("moebench inspect needs only config.json, no weights" if config_only
             else "loading the model needs config.json and the weights")
    return (f"{repo_id} is not a local folder, so it is read as a hub id{hint}; {why}, and its config.json is not "
            f"in the local cache ({HF_HUB_CACHE}). {needs}: download {'it' if config_only else 'them'} where the "
            f"Hub is reachable (`hf download {repo_id}{' config.json' if config_only else ''}`) and run again with "
            "HF_HUB_OFFLINE=1 to read the cache, or give a local folder that holds "
            f"{'it' if config_only else 'the model'}")


def per_layer_counts(config) -> dict[int, int] | None:
    """Expert count per MoE decoder layer recorded by moebench in a config, or None if uniform."""
    text = getattr(config, "text_config", None) or config
    counts = getattr(text, PER_LAYER_KEY, None)
    return {int(k): int(v) for k, v in counts.items()} if counts else None


def save_pruned(model, out_dir: str, shown_as: str | None = None, layout: str = "compact", **save_kwargs) -> None:
    """Save a (pruned) model; non-uniform counts are saved in moebench's loadable form, with a warning.

    ``shown_as``: the folder to name in that warning when ``out_dir`` is a temporary one. A model with novice
    experts (MoNE) is saved with its constants (`moebench.moe.novice.save_novices`), also with a warning.
    """
    from moebench.moe.novice import attached_novices, save_novices

    if attached_novices(model):
        with loading_bars():
            save_novices(model, out_dir, shown_as, **save_kwargs)
        return
    if _save_merged(model, out_dir, shown_as, layout, **save_kwargs):
        return
    counts = per_layer_counts(model.config)
    if counts is None:
        with loading_bars():
            model.save_pretrained(out_dir, **save_kwargs)
        return
    warnings.warn(
        f"experts per layer differ ({sorted(set(counts.values()))}): plain transformers cannot load this "
        f"checkpoint (its config holds one expert count); load it with moebench.moe.checkpoint.load_model("
        f"'{shown_as or out_dir}') or any moebench command", NonUniformCheckpointWarning, stacklevel=2)
    with loading_bars():
        model.save_pretrained(out_dir, save_original_format=False, **save_kwargs)


def _save_merged(model, out_dir: str, shown_as: str | None, layout: str, **save_kwargs) -> bool:
    """`save_pruned` of a merged model that keeps every router row (``layout``: compact or duplicated, see the
    module docstring); False for any other model (nothing written)."""
    from moebench.moe.expert_map import LAYOUTS, duplicated, model_maps

    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: choose compact (moebench loads it) or duplicated (a plain checkpoint)")
    if not model_maps(model):
        return False
    if layout == "duplicated":
        with duplicated(model), loading_bars():
            model.save_pretrained(out_dir, **save_kwargs)
        return True
    warnings.warn(
        "merged experts behind all their router rows (router=all), saved compact: the config keeps the router's "
        "expert count and moebench_expert_map; plain transformers and vLLM cannot load it (transformers refuses "
        f"the experts' shapes); load it with moebench.moe.checkpoint.load_model('{shown_as or out_dir}') or any "
        "moebench command, or save the duplicated layout (moebench prune --layout duplicated), a plain checkpoint",
        ExpertMapCheckpointWarning, stacklevel=3)
    with loading_bars():
        model.save_pretrained(out_dir, save_original_format=False, **save_kwargs)
    return True


def moebench_form(folder: str) -> bool:
    """Whether the checkpoint in ``folder`` is one of moebench's own forms that plain transformers cannot build
    (per-layer expert counts, a compact merge that keeps every router row): `load_model` loads those."""
    from moebench.moe.expert_map import MAP_KEY

    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError):
        return False
    return any(isinstance(part, dict) and (part.get(PER_LAYER_KEY) or part.get(MAP_KEY))
               for part in (raw, raw.get("text_config")))


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




def config_size_problem(config) -> str | None:
    """Why a config cannot be a real model (sizes far beyond any published one), or None. Checked before the model
    is built, even on the meta device: a config claiming 10^5 layers of 10^4 experts would take hours to build."""
    from moebench.moe.families import family_for

    text = getattr(config, "text_config", None) or config
    checks = [("num_hidden_layers", MAX_LAYERS)]
    family = family_for(getattr(text, "model_type", ""))
    if family is not None:
        checks.append((family.count_key, MAX_EXPERTS))
    checks += [(key, MAX_WIDTH) for key in ("hidden_size", "intermediate_size", "moe_intermediate_size", "vocab_size")]
    for key, limit in checks:
        value = getattr(text, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and not 0 <= value <= limit:
            return (f"its config declares {key}={value}, beyond any real model (at most {limit}); the config is "
                    "damaged or not a model's")
    return None


def _build_skeleton(config, counts: dict[int, int], **from_config_kwargs):
    """A model from ``config`` whose layers are cut to ``counts`` experts (random weights); a compact merged
    checkpoint's layers (``moebench_expert_map``) get their merged experts and maps (`moebench.moe.expert_map`)."""
    problem = config_size_problem(config)
    if problem:
        raise ValueError(problem)
    model = AutoModelForCausalLM.from_config(config, **from_config_kwargs)
    view = MoEView(model)
    for index, n in counts.items():
        _prune_layer(view.layer(index), list(range(n)))
    from moebench.moe.expert_map import build, expert_maps

    maps = expert_maps(config)
    if maps:
        build(model, maps)
    return model


def _load_state_dict(folder: str) -> dict[str, torch.Tensor]:
    """All tensors of the safetensors files in a checkpoint folder (MoNE's constants, beside them, excepted)."""
    from safetensors.torch import load_file

    from moebench.moe.novice import NOVICE_FILE

    files = sorted(f for f in glob.glob(os.path.join(folder, "*.safetensors")) if os.path.basename(f) != NOVICE_FILE)
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {folder}")
    state = {}
    for path in files:
        state.update(load_file(path))
    return state


def read_config(path: str, revision: str | None = None, trust_remote_code: bool = False):
    """A checkpoint's config (``path``: a folder or hub id, after `resolve`).

    Where transformers does not know the config's ``model_type`` and remote code is not trusted, the class
    its ``architectures`` names is used if transformers ships it (Kimi-K2: ``model_type`` ``kimi_k2``,
    ``DeepseekV3ForCausalLM``), with a warning; the checkpoint's own code is never run without
    ``trust_remote_code``.
    """
    try:
        return AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except ValueError:
        if trust_remote_code:
            raise
        native = _native_config(path, revision)
        if native is None:
            raise
        return native


def _native_config(path: str, revision: str | None):
    """The config of the transformers class named in config.json's ``architectures`` (None if it names none)."""
    import transformers

    try:
        if os.path.isdir(path):
            file = os.path.join(path, "config.json")
        else:
            from huggingface_hub import hf_hub_download

            file = hf_hub_download(path, "config.json", revision=revision)
        with open(file, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError):
        return None
    architecture = (raw.get("architectures") or [None])[0]
    model_class = getattr(transformers, architecture, None) if isinstance(architecture, str) else None
    config_class = getattr(model_class, "config_class", None)
    if config_class is None or getattr(config_class, "model_type", None) in (None, "", raw.get("model_type")):
        return None
    log.warning("%s: model_type %r is not one transformers knows; building it as transformers' own %s (%s), as "
                "its config.json's architectures say. Its own code runs only with --trust-remote-code",
                path, raw.get("model_type"), architecture, config_class.model_type)
    values = {k: v for k, v in raw.items() if k not in ("model_type", "auto_map")}
    return config_class(**values)


def load_model(name_or_path: str, dtype="auto", **kwargs):
    """Load a causal LM by hub id, folder or testbed name; also loads moebench's non-uniform checkpoints.

    Extra keyword arguments go to ``from_pretrained`` (revision, device_map, trust_remote_code, ...).
    """
    path = resolve(name_or_path)
    if not os.path.isdir(path):
        check_hub_config(path, kwargs.get("revision"))
    config = read_config(path, kwargs.get("revision"), bool(kwargs.get("trust_remote_code")))
    problem = config_size_problem(config)
    if problem:
        raise ValueError(f"{name_or_path}: {problem}")
    counts = per_layer_counts(config)
    from moebench.moe.formats import fp8_ragged_blocks, quantization  # formats builds on this module's readers
    from moebench.moe.novice import attach_saved_novices, saved_novice_layers

    novices = saved_novice_layers(config)  # MoNE: the router keeps its rows, the experts are cut, constants beside

    if quantization(config) is not None:
        fp8_ragged_blocks()  # transformers' FP8 dequantization of partial blocks (DeepSeek-V3's 576-row weights)
    from moebench.moe.expert_map import expert_maps

    if counts is None and novices is None and not expert_maps(config):
        from safetensors import SafetensorError

        try:
            with loading_bars():
                return AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype, **kwargs).eval()
        except SafetensorError as err:  # it names no file: find the damaged one(s)
            from moebench.moe.files import damaged_shards

            found = damaged_shards(path if os.path.isdir(path) else local_folder(path, kwargs.get("revision")))
            raise ValueError("; ".join(found) or f"{name_or_path}: a safetensors file is damaged ({err}); download "
                             "or write it again") from None
    if not os.path.isdir(path):
        raise ValueError(f"{name_or_path}: non-uniform moebench checkpoints load from a local folder only")
    model = _build_skeleton(config, counts or {}, dtype=_config_dtype(config) if dtype == "auto" else dtype)
    if novices is not None:
        attach_saved_novices(model, path, novices)
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
    if not os.path.isdir(path):
        check_hub_config(path, kwargs.get("revision"), config_only=True)
    config = read_config(path, kwargs.get("revision"), bool(kwargs.get("trust_remote_code")))
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


def check_device(device: str | None, spelled: str = "--device") -> str:
    """``device`` (default: `default_device`) if this machine has it; otherwise a ValueError that names it and
    the fix, raised before anything is loaded. ``spelled``: how the user gave it (``--device`` or ``device=``)."""
    if device is None:
        return default_device()
    given = f"{spelled}{device}" if spelled.endswith("=") else f"{spelled} {device!r}"
    cpu = f"{spelled}cpu" if spelled.endswith("=") else f"{spelled} cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"{given} is not a device torch knows ({err}); give cpu, cuda or cuda:N") from err
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if not torch.backends.cuda.is_built() else "no GPU is visible"
            raise ValueError(f"{given}: CUDA is not available on this machine ({why}; torch {torch.__version__}); "
                             f"use {cpu}, or run where a GPU is")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"{given}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{given}: MPS is not available on this machine; use {cpu}")
    return device


def load_with_tokenizer(name_or_path: str, dtype="auto", device: str | None = None, **kwargs):
    """``(model on device, tokenizer)`` for a hub id, folder or testbed name; with a ``device_map`` keyword
    (accelerate's placement, e.g. ``"auto"``) the model stays where that puts it."""
    from transformers import AutoTokenizer

    model = load_model(name_or_path, dtype=dtype, **kwargs)
    if kwargs.get("device_map") is None:
        model = model.to(check_device(device))
    tokenizer = AutoTokenizer.from_pretrained(resolve(name_or_path), revision=kwargs.get("revision"),
                                              trust_remote_code=bool(kwargs.get("trust_remote_code")))
    return model, tokenizer


def download_snapshot(repo_id: str, revision: str | None) -> str:
    """The local snapshot folder of a hub checkpoint (config, index, shards, tokenizer files)."""
    from huggingface_hub import snapshot_download


    check_hub_config(repo_id, revision)
    return snapshot_download(repo_id, revision=revision,
                             allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])


def local_folder(name_or_path: str, revision: str | None = None) -> str:
    """The local folder of a checkpoint: a folder or registered name as is, a hub id's cached snapshot."""
    path = resolve(name_or_path)
    if os.path.isdir(path):
        return path
    return download_snapshot(path, revision)


# ----- the size checks behind --sequential's default (moebench.moe.layered does the layered work) -----

def checkpoint_bytes(name_or_path: str, revision: str | None = None) -> int | None:
    """Bytes of a checkpoint's safetensors weights: the files of a folder, or a hub index's ``total_size``
    (None where neither can be read, e.g. a hub id offline)."""
    path = resolve(name_or_path)
    if os.path.isdir(path):
        files = [f for f in os.listdir(path) if f.endswith(".safetensors")]
        return sum(os.path.getsize(os.path.join(path, f)) for f in files) or None
    try:
        from huggingface_hub import hf_hub_download

        with open(hf_hub_download(path, SAFE_WEIGHTS_INDEX_NAME, revision=revision), encoding="utf-8") as f:
            return int(json.load(f)["metadata"]["total_size"])
    except Exception:  # no index (a single-file model is small), offline, or no such repository
        return None


def free_bytes(device: str | torch.device) -> int | None:
    """Free memory of ``device``: the GPU's free memory, or the machine's available memory for the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def _memory_growth(name_or_path: str, device, revision: str | None) -> float:
    """`moebench.moe.formats.memory_growth` of a checkpoint's config (1 where the config cannot be read)."""
    from moebench.moe.formats import memory_growth

    try:
        config = read_config(resolve(name_or_path), revision)
    except Exception:  # offline hub id, remote code: the on-disk size stands
        return 1.0
    return memory_growth(config, device)


def quantized_on_device(name_or_path: str, device, revision: str | None = None) -> str | None:
    """Why calibration must read the model one layer at a time on ``device``: transformers would keep its experts
    quantized there (FP8 on a GPU of compute capability >= 8.9), which the statistics pass cannot observe; the
    layer-by-layer path dequantizes each layer as it reads it. None otherwise."""
    from moebench.moe.formats import format_name, memory_growth, quant_method

    try:
        config = read_config(resolve(name_or_path), revision)
    except Exception:  # unreadable here: loading will say why
        return None
    if quant_method(config) is None or memory_growth(config, device) != 1.0:
        return None
    return (f"{name_or_path}: transformers keeps its {format_name(config)} weights quantized on {device}, and the "
            "statistics pass observes full-precision experts; calibrating one decoder layer at a time, each layer "
            "dequantized as it is read (sequential; the pruned checkpoint stays in the source's format)")


LOAD_HEADROOM = 1.2  # weights x this must fit: activations, the allocator's slack, the statistics pass


def sequential_needed(name_or_path: str, device: str | torch.device, revision: str | None = None) -> str | None:
    """Why the model must be worked on one layer at a time (its weights, with `LOAD_HEADROOM`, exceed the
    device's free memory), as a log line; None when it fits or its size is unknown."""
    size, free = checkpoint_bytes(name_or_path, revision), free_bytes(device)
    if size is None or free is None:
        return None
    growth = _memory_growth(name_or_path, device, revision)
    if size * growth * LOAD_HEADROOM <= free:
        return None
    dequantized = f", {growth:.1f}x once dequantized" if growth != 1 else ""
    return (f"{name_or_path}: its weights ({size / 2**30:.1f} GiB on disk{dequantized}, x{LOAD_HEADROOM} for "
            "activations) exceed the "
            f"free memory of {device} ({free / 2**30:.1f} GiB); working one decoder layer at a time (sequential; "
            "--no-sequential or sequential=false to load it whole)")
