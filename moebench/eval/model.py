"""``pruned_moe``: lm-eval's ``hf`` model with routed experts removed by a moebench method.

    lm_eval --model pruned_moe --tasks arc_easy \\
        --model_args pretrained=mistralai/Mixtral-8x7B-v0.1,method=reap,ratio=0.5,calib=c4

Every ``hf`` model_arg keeps working; `PrunedMoELM` adds ``method``, ``ratio`` / ``keep``, ``calib``,
``calib_samples``, ``calib_seq_len``, ``seed``, ``stats_dir``, ``apply`` (``physical`` | ``mask``),
``skip``, the statistics settings ``subsample_tokens`` / ``ratio_samples`` and the chosen method's
own parameters. Any other key is an error with a suggestion:
nothing unknown reaches ``from_pretrained``.

Lazy: the model is loaded and the arguments are checked at construction; the plan (calibration
statistics from the cache when present) is made and applied at the first request.

No silent mix-ups with lm-eval's bookkeeping, which identifies a run by ``pretrained`` alone:
``--use_cache`` responses of each variant live in their own table of the cache file, the
``--output_path`` folder is named ``<pretrained>__<method>-<budget>-<variant hash>``, and the
results' ``config`` gains a ``moebench`` entry: method, parameters, calibration key, kept experts
per layer and the parameter count and expert bytes before and after.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time

import torch
from lm_eval.models.huggingface import HFLM

from moebench.eval.args import (
    EXECUTION_ARGS,
    PrunedMoESettings,
    repeated_in_command_line,
    repeated_keys,
    split_model_args,
)
from moebench.eval.plugin import register as _register
from moebench.eval.select import SelectMixin
from moebench.method.apply import Applied
from moebench.method.pipeline import PlanRequest, calib_key, prepare, skip_betas
from moebench.method.plan import Plan
from moebench.method.registry import resolve_budget
from moebench.moe.checkpoint import check_device, default_device, loading_bars, resolve
from moebench.moe.skipping import skip_report
from moebench.moe.view import MoEView

log = logging.getLogger(__name__)


def model_sizes(model) -> tuple[int, int]:
    """``(parameters, bytes held by routed experts)`` of a model as it is now."""
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    try:
        return params, MoEView(model).expert_bytes()
    except ValueError:  # not an MoE model (possible with method=none)
        return params, 0


def pruned_sizes(view: MoEView, keep: dict[int, list[int]]) -> tuple[int, int]:
    """``(parameters, expert bytes)`` the model would have with only ``keep`` (for apply=mask)."""
    params, expert_bytes = model_sizes(view.model)
    for layer in view.layers:
        n = layer.num_experts
        dropped = n - len(keep.get(layer.index, range(n)))
        per_expert = list(layer.expert_tensors().values())
        per_expert += [t for t, _ in layer.router_tensors().values()]
        params -= dropped * sum(t.numel() for t in per_expert if isinstance(t, torch.nn.Parameter)) // n
        expert_bytes -= dropped * layer.expert_bytes() // n
    return params, expert_bytes


class PrunedMoELM(SelectMixin, HFLM):
    """lm-eval's ``hf`` model whose routed experts a moebench method prunes (or masks) at the first request.

    Attributes:
        settings: the validated `PrunedMoESettings`.
        variant_id: hash of everything that decides this variant's outputs.
        variant_name: ``<pretrained>__<method>-<budget>-<hash>``, the ``--output_path`` folder name.
        applied: the model with its plan in effect (`moebench.method.apply.Applied`), after the first request.
        record: what was applied; the results' ``config["moebench"]``.
        source: where the unpruned model comes from (``path``, ``revision``, ``trust_remote_code``).
    """

    def __init__(self, pretrained, **kwargs):
        if os.path.basename(sys.argv[0]) in ("lm_eval", "lm-eval") or sys.argv[:1] == ["lm-eval"]:
            repeated = repeated_in_command_line(sys.argv[1:])  # lm-eval merged the raw string, keeping the last
            if repeated:
                raise ValueError(repeated)
        hf, own, params = split_model_args({"pretrained": pretrained, **kwargs})
        self.settings = PrunedMoESettings.from_args(own, params)
        from moebench.moe.formats import fp8_ragged_blocks

        fp8_ragged_blocks()  # lm-eval loads FP8 checkpoints with transformers' dequantization: partial blocks right
        if hf.get("device") is not None:  # given: a device this machine lacks is named now, before any work
            check_device(str(hf["device"]), "device=")
        hf.pop("pretrained")
        self._check_inputs(pretrained, hf.get("revision"))
        self._presliced = None  # sequential=true: (pruned folder, sizes of the unpruned model)
        load_from = resolve(pretrained) if isinstance(pretrained, str) else pretrained
        if self.settings.sequential:
            if not isinstance(pretrained, str):
                raise ValueError("sequential=true reads a checkpoint layer by layer: "
                                 "give pretrained=<hub id or folder>")
            load_from = self._prune_sequentially(pretrained, hf)
        # offload=true on a GPU: loaded in host memory, then only the non-expert weights move to the GPU (the
        # experts stay in a pinned host store), so a model larger than the GPU never has to fit it whole
        target = str(hf.get("device") or default_device())
        host_first = (self.settings.offload and not self.settings.sequential and torch.cuda.is_available()
                      and torch.device(target).type == "cuda" and not hf.get("device_map")
                      and not hf.get("parallelize"))
        with loading_bars():
            super().__init__(pretrained=load_from, **({**hf, "device": "cpu"} if host_first else hf))
        self._offloader, self._sizes_before = None, None
        if host_first:
            from moebench.moe.offload import ExpertOffloader

            self._sizes_before = model_sizes(self.model)
            self._offloader = ExpertOffloader.onto(self.model, target)
            self._device = torch.device(target)
            log.info("pruned_moe: offload=true: loaded in host memory; routed experts kept there (%.4g GB pinned), "
                     "the rest moved to %s", self._offloader.host_bytes / 1e9, target)
        self.pretrained_id = self._pretrained_id(pretrained)
        self.source = {"path": resolve(pretrained) if isinstance(pretrained, str) else None,
                       "revision": hf.get("revision"), "trust_remote_code": bool(hf.get("trust_remote_code"))}
        self.request = self._plan_request(hf.get("revision"))
        s = self.settings
        self.calib_key = calib_key(self.request, s.spec.kind) if s.uses_data else None
        self.variant_id, self.variant_name = self._identity(pretrained, hf)
        self.applied = None
        self.record: dict | None = None
        self._relabelled = None

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """lm-eval's constructor from ``key=value,...``; a key given twice with two values is refused."""
        repeated = repeated_keys(arg_string)
        if repeated:
            raise ValueError(repeated)
        return super().create_from_arg_string(arg_string, additional_config)

    # ----- construction helpers ----------------------------------------------------------------

    def _prune_sequentially(self, pretrained: str, hf: dict) -> str:
        """`prune_sequentially` with this model's settings; remembers the folder and the unpruned sizes."""
        folder, before = prune_sequentially(pretrained, self.settings, hf)
        self._presliced = (folder, before)
        return folder

    @staticmethod
    def _pretrained_id(pretrained) -> str:
        if not isinstance(pretrained, str):
            return getattr(pretrained.config, "_name_or_path", "") or type(pretrained).__name__
        path = resolve(pretrained)
        return os.path.abspath(path) if os.path.isdir(path) else pretrained

    def _plan_request(self, revision) -> PlanRequest:
        """The plan request; the budget is checked against the model now (no statistics needed)."""
        s = self.settings
        seq_len = s.calib_seq_len
        if self._presliced is not None:  # the loaded model is pruned already; the budget was checked on the source
            return s.request(self.pretrained_id, revision, seq_len or 2048)
        if not s.spec.is_identity or s.skip != "none":
            view = MoEView(self.model)
            if not s.spec.is_identity:
                resolve_budget(view, ratio=s.ratio, keep=s.keep)
            seq_len = seq_len or min(2048, getattr(view.config, "max_position_embeddings", 2048) or 2048)
        return s.request(self.pretrained_id, revision, seq_len or 2048)

    def _identity(self, pretrained, hf: dict) -> tuple[str, str]:
        """Hash of what decides the outputs (execution-only args left out) and the readable variant name."""
        s = self.settings
        identity = {"model": self.pretrained_id, **{k: hf[k] for k in sorted(hf) if k not in EXECUTION_ARGS},
                    "method": s.method, "params": s.params, "ratio": s.ratio, "keep": s.keep,
                    "calib": self.calib_key, "seed": s.seed, "apply": s.apply, "skip": s.skip,
                    "skip_beta": s.skip_beta}
        # statistics settings only when given, so the variants named before they existed keep their names
        identity.update({k: v for k in ("subsample_tokens", "ratio_samples") if (v := getattr(s, k)) is not None})
        if s.recover is not None:  # only when set: variants without recovery keep their names
            identity["recover"] = s.recover.to_dict()
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
        budget = f"-r{s.ratio:g}" if s.ratio is not None else f"-k{s.keep}" if s.keep is not None else ""
        recovered = f"-{s.recover.kind}" if s.recover is not None else ""
        tag = f"{s.method}{budget}{'-mask' if s.apply == 'mask' else ''}{recovered}-{digest[:8]}"
        name = pretrained if isinstance(pretrained, str) else self.pretrained_id
        return digest, f"{name}__{tag}"

    @property
    def cache_table(self) -> str:
        """The table of lm-eval's ``--use_cache`` file that holds this variant's responses."""
        return f"pruned_moe-{self.variant_id}"

    # ----- lm-eval bookkeeping -----------------------------------------------------------------

    @classmethod
    def create_from_arg_obj(cls, arg_dict, additional_config=None):
        """As HFLM's, and the run is labelled with the variant name for ``--output_path``.

        lm-eval 0.4.13 names the output folder after ``model_args["pretrained"]``, read from this
        very dict right after construction. lm-eval's ``--device`` (``cuda:0`` unless given) on a
        machine without it falls back to the CPU with a warning, as lm-eval's ``hf`` model does; a
        ``device`` in the model_args is checked strictly (see ``__init__``). The dict holds the
        variant name until the first request (or the results are assembled), then the value the user
        gave again.
        """
        additional_config = dict(additional_config or {})
        device = additional_config.get("device")
        if device is not None and "device" not in arg_dict:  # lm-eval's --device (cuda:0 unless given)
            try:
                check_device(str(device))
            except ValueError as err:  # as lm-eval's hf model does, said before any work
                log.warning("pruned_moe: %s; running on cpu, as lm-eval's hf model does", err)
                additional_config["device"] = "cpu"
        lm = super().create_from_arg_obj(arg_dict, additional_config)
        if isinstance(arg_dict.get("pretrained"), str):
            lm._relabelled = (arg_dict, arg_dict["pretrained"])
            arg_dict["pretrained"] = lm.variant_name
        return lm

    def _restore_label(self) -> None:
        if self._relabelled is not None:
            args, original = self._relabelled
            if args.get("pretrained") == self.variant_name:
                args["pretrained"] = original
            self._relabelled = None

    def set_cache_hook(self, cache_hook) -> None:
        """Keep ``--use_cache`` responses of this variant in their own table of the cache file.

        lm-eval keys cached responses by the request alone; sharing its default table would hand
        one variant's (or the unpruned model's) answers to another.
        """
        db = getattr(cache_hook, "dbdict", None)
        if db is not None and db.tablename != self.cache_table:
            db.close()
            db.__init__(db.filename, tablename=self.cache_table, autocommit=db.autocommit,
                        journal_mode=db.journal_mode)
            log.info("pruned_moe: --use_cache responses of %s are kept in table %r of %s",
                     self.variant_name, self.cache_table, db.filename)
        super().set_cache_hook(cache_hook)

    def get_model_info(self) -> dict:
        """HFLM's model information plus ``moebench``: the variant and what it changed."""
        self._prepare()
        if self.record is not None and self.settings.skip != "none":
            self.record["skipping"] = skip_report(self.model)  # realised skip rate so far
        return {**super().get_model_info(), "moebench": self.record}

    # ----- lazy application --------------------------------------------------------------------

    def loglikelihood(self, requests, *args, **kwargs):
        self._prepare()
        return super().loglikelihood(requests, *args, **kwargs)

    def loglikelihood_rolling(self, requests, *args, **kwargs):
        self._prepare()
        return super().loglikelihood_rolling(requests, *args, **kwargs)

    def generate_until(self, requests, *args, **kwargs):
        self._prepare()
        return super().generate_until(requests, *args, **kwargs)

    def apply_plan(self) -> dict:
        """Make and apply the plan now rather than at the first request (grid cells do, so that memory is
        measured after it); returns the record."""
        self._prepare()
        return self.record

    @property
    def presliced(self) -> bool:
        """Whether the model was loaded pruned (``sequential=true``)."""
        return self._presliced is not None

    @property
    def unpruned_bytes(self) -> int:
        """Weight bytes of the unpruned model: now, before the plan is applied; afterwards (and for a model
        loaded pruned) the current bytes with the routed experts counted as they were before."""
        total = sum(t.numel() * t.element_size() for t in {id(p): p for p in self.model.parameters()}.values())
        if self._presliced is None and self.record is None:
            return total
        experts_before = self._presliced[1][1] if self.record is None else self.record["expert_bytes"]["before"]
        return total - model_sizes(self.model)[1] + experts_before

    def _prepare(self) -> None:
        self._restore_label()
        if self.record is None:
            self.record = self._apply()

    def _apply(self) -> dict:
        """Make the method's plan and apply it to the model; returns the record for the results."""
        s, model = self.settings, self.model
        before = self._sizes_before or model_sizes(model)  # counted before any host-first offloading
        start = time.perf_counter()
        record = {"variant": self.variant_name, "variant_id": self.variant_id, "pretrained": self.pretrained_id,
                  "method": s.method, "params": s.params, "ratio": s.ratio, "keep": s.keep,
                  "calib": self.calib_key, "seed": s.seed, "apply": s.apply, "skip": s.skip}
        if self._presliced is not None:  # sequential=true: loaded pruned; only skipping remains to switch on
            folder, before = self._presliced  # the sizes of the unpruned model, counted on its skeleton
            self.applied = Applied(model, Plan.load(os.path.join(folder, "plan.json")), "physical")
            if self.request.skip != "none":
                self.applied.enable_skip(skip_betas(model, self.tokenizer, self.request, self.rank == 0),
                                         self.request.skip)
            record["sequential"] = folder
        else:
            targets = self._teacher_targets() if s.recover is not None and s.recover.kind == "router_kd" else None
            self.applied = prepare(model, self.tokenizer, self.request, s.apply, self._offloader or s.offload,
                                   progress=self.rank == 0)
            if s.recover is not None:
                record["recover"] = self._recover(targets)
        plan = self.applied.plan
        seconds = round(time.perf_counter() - start, 3)
        if s.spec.is_identity:
            experts = MoEView(model).experts_per_layer if before[1] else {}
            return {**record, **self._sizes_record(before, before, before), "experts_per_layer": _str_keys(experts)}
        if self.applied.selects:  # nothing removed: per-request selections (moebench.eval.select)
            return self._start_select({**record, **self._sizes_record(before, before, before),
                                       "experts_per_layer": _str_keys(plan.experts_kept()),
                                       "kept_experts": _str_keys(plan.keep), "seconds": seconds})
        after = model_sizes(model)
        if_pruned = after if s.apply == "physical" else pruned_sizes(MoEView(model), plan.keep)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if self.rank == 0:  # said on stderr: lm-eval shows no INFO records of other loggers
            kept = sorted(set(plan.experts_kept().values()))
            budget = f"ratio {self.request.ratio:g}" if self.request.ratio is not None else "its budget"
            print(f"pruned_moe: {s.method} at {budget} kept {kept} experts per MoE layer "
                  f"({s.apply}); parameters {before[0] / 1e6:.4g}M -> {after[0] / 1e6:.4g}M, expert bytes "
                  f"{before[1] / 1e6:.4g} MB -> {after[1] / 1e6:.4g} MB; planned and applied in "
                  f"{time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)
        rounding = {k: plan.extra[k] for k in ("ratio_realised", "budget_note") if k in plan.extra}
        return {**record, **rounding, **self._sizes_record(before, after, if_pruned),
                "experts_per_layer": _str_keys(plan.experts_kept()), "kept_experts": _str_keys(plan.keep),
                "seconds": seconds}

    def _teacher_targets(self) -> dict:
        """The unpruned model's next-token targets on the recovery windows (before the plan is applied), from the
        statistics cache or computed in one pass and cached there."""
        from moebench.method.recover import cached_teacher_targets

        s = self.settings
        return cached_teacher_targets(self.model, self.tokenizer, s.recover, s.stats_dir, self.request.model_id,
                                      self.request.revision, progress=self.rank == 0)

    def _recover(self, targets: dict | None) -> dict:
        """Train the pruned model in place (the recovery stage) and say what it did."""
        from moebench.method.recover import recover

        model, record = recover(self.model, self.tokenizer, self.settings.recover, targets, progress=self.rank == 0)
        if model is not self.model:
            raise RuntimeError("recover returned a new model object; the lm-eval model holds the old one")
        if self.rank == 0:
            print(f"pruned_moe: recover {self.settings.recover.label()}: loss {record['loss_first_tenth']:.4f} -> "
                  f"{record['loss_last_tenth']:.4f} (mean of the first / last tenth of the steps), "
                  f"{record['trained_parameters']:,} parameters trained in {record['seconds']:.1f}s",
                  file=sys.stderr, flush=True)
        return record

    def _create_model(self, pretrained, *args, **kwargs) -> None:
        """HFLM's loading, except for a folder holding one of moebench's own forms that plain transformers cannot
        build (a compact merge that keeps every router row, per-layer expert counts): that one loads with
        `moebench.moe.checkpoint.load_model`."""
        from moebench.moe.checkpoint import load_model, moebench_form

        if isinstance(pretrained, str) and os.path.isdir(pretrained) and moebench_form(pretrained):
            from lm_eval.models.utils_hf import get_dtype

            self._model = load_model(pretrained, dtype=get_dtype(kwargs.get("dtype", "auto")),
                                     trust_remote_code=bool(kwargs.get("trust_remote_code")))
            return
        super()._create_model(pretrained, *args, **kwargs)

    def _check_inputs(self, pretrained, revision: str | None) -> None:
        """Refuse, before any loading, a hub id neither cached nor reachable and a calibration source that cannot be
        read now (unless the statistics cache may hold what the run needs), each with what to do."""
        from moebench.calib.cache import default_stats_dir
        from moebench.calib.sources import availability_problem
        from moebench.moe.checkpoint import check_hub_config

        if isinstance(pretrained, str) and not os.path.isdir(resolve(pretrained)):
            check_hub_config(resolve(pretrained), revision)
        s = self.settings
        if s.uses_data and s.calib:
            problem = availability_problem(s.calib, s.stats_dir or default_stats_dir(), s.calib_samples, s.seed)
            if problem:
                raise OSError(f"pruned_moe: {problem}")
        if s.recover is not None and (problem := availability_problem(s.recover.data)):
            raise OSError(f"pruned_moe: recover_data: {problem}")

    @staticmethod
    def _sizes_record(before, after, if_pruned) -> dict:
        return {"parameters": {"before": before[0], "after": after[0], "if_pruned": if_pruned[0]},
                "expert_bytes": {"before": before[1], "after": after[1], "if_pruned": if_pruned[1]}}


def prune_sequentially(pretrained: str, settings: PrunedMoESettings, hf: dict,
                       layout: str = "compact") -> tuple[str, tuple[int, int]]:
    """Plan on a layer-by-layer skeleton (`moebench.moe.layered`) and write the pruned checkpoint shard by
    shard into ``$MOEBENCH_CACHE/pruned/<key>`` (reused when present); returns that folder and the unpruned
    model's ``(parameters, expert bytes)``. The model is never loaded whole.

    ``layout``: how a merge that keeps every router row is written (`moebench.moe.checkpoint.save_pruned`):
    ``compact`` (only the merged experts, a member->expert map in the config; moebench loads it, so the memory
    figures are the merged model's, as in memory) or ``duplicated`` (all E slots, copies: the plain form vLLM
    reads)."""
    from transformers import AutoTokenizer

    from moebench.calib.cache import default_stats_dir, model_key
    from moebench.method.apply import apply
    from moebench.method.pipeline import make_plan
    from moebench.moe.checkpoint import save_folder
    from moebench.moe.formats import parse_save_dtype, raw_config, save_sliced, writer_refusal
    from moebench.moe.layered import LayeredCheckpoint
    from moebench.moe.streaming import save_streaming

    s = settings
    device = str(hf.get("device") or default_device())
    if device.startswith("cuda") and not torch.cuda.is_available():  # as HFLM falls back
        device = "cpu"
    remote = bool(hf.get("trust_remote_code"))
    layered = LayeredCheckpoint(pretrained, dtype=hf.get("dtype", "auto"), revision=hf.get("revision"),
                                device=device, trust_remote_code=remote)
    tokenizer = AutoTokenizer.from_pretrained(layered.path, trust_remote_code=remote)
    save_dtype = parse_save_dtype(s.save_dtype)
    source_config = raw_config(layered.path)
    refusal = writer_refusal(source_config, layered.path, merges=s.spec.kind == "merge", uniform=True,
                             save_dtype=save_dtype)
    if refusal:
        raise ValueError(f"pruned_moe: {pretrained}: {refusal}")
    config = MoEView(layered.model).config
    seq_len = s.calib_seq_len or min(2048, getattr(config, "max_position_embeddings", 2048) or 2048)
    request = s.request(PrunedMoELM._pretrained_id(pretrained), hf.get("revision"), seq_len)
    before = model_sizes(layered.model)
    identity = {"model": model_key(layered.model, request.model_id, request.revision), "method": s.method,
                "params": s.params, "ratio": s.ratio, "keep": s.keep, "calib": calib_key(request, s.spec.kind),
                "seed": s.seed, "settings": vars(request.collect_settings()), "dtype": str(layered.dtype),
                "save_dtype": str(save_dtype), **({"layout": layout} if layout != "compact" else {})}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
    root = os.path.dirname(s.stats_dir or default_stats_dir())
    folder = os.path.join(root, "pruned", f"{s.method}-{digest}")
    if os.path.exists(os.path.join(folder, "plan.json")):
        log.info("pruned_moe: sequential=true: the pruned checkpoint %s exists; evaluating it", folder)
    else:
        plan = make_plan(layered.model, tokenizer, request)
        counts = MoEView(layered.model).experts_per_layer
        refusal = writer_refusal(source_config, layered.path, merges=bool(plan.merge),
                                 uniform=len(set(plan.experts_kept().values())) == 1, save_dtype=save_dtype)
        if refusal:
            raise ValueError(f"pruned_moe: {pretrained}: {refusal}")
        apply(layered.model, plan, "physical")  # the meta skeleton: the pruned config
        if not plan.merge and len(set(plan.experts_kept().values())) == 1:  # the source's format, MTP kept
            def checkpoint(d):
                save_sliced(layered.path, layered.model, plan.keep, counts, d, save_dtype=save_dtype)
        else:
            source = LayeredCheckpoint(layered.path, dtype=save_dtype or layered.dtype, device="cpu",
                                       trust_remote_code=remote)

            def checkpoint(d):
                save_streaming(source, plan.keep, d, layered.model.config, merge=plan.merge,
                               expert_map=plan.expert_map, layout=layout)
        save_folder(folder, {"checkpoint": checkpoint,
                             "tokenizer": tokenizer.save_pretrained,
                             "plan.json": lambda d: plan.save(os.path.join(d, "plan.json"))})
        log.info("pruned_moe: sequential=true: wrote the pruned checkpoint to %s", folder)
    return folder, before


def _str_keys(mapping: dict) -> dict:
    return {str(k): v for k, v in sorted(mapping.items())}


_register()  # importing this module directly also makes `pruned_moe` known to lm-eval
