"""Recovery after pruning: a short training stage on the pruned (or merged) model, before evaluation or saving.

Three kinds, each trained on windows of a calibration source (`moebench.calib.sources`, packed exactly like
calibration: documents joined by eos, no padding):

``lora``
    PEFT LoRA on the attention projections (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` where the model
    has them) and on the fused expert tensors through PEFT's ``target_parameters`` (every ``[E, ...]``
    parameter of the experts module, e.g. ``mlp.experts.gate_up_proj`` and ``mlp.experts.down_proj``).
    Loss: next-token cross-entropy on the windows. The adapters are merged into the weights afterwards, so
    the result is a plain checkpoint of the pruned size. Defaults follow the REAP authors' SFT script:
    rank 8, alpha 16, learning rate 5e-5, cosine schedule with 3% warm-up. Ours: the number of steps
    (their script runs one epoch of the calibration set), and the experts' rank: PEFT gives every expert of
    a fused tensor its own rank-r adapter, so the experts' rank is set (``rank_pattern``) to
    ``max(1, round(r * top_k / E))`` per expert, which keeps the adapter rank a token's routed path sees
    near r, as for a dense MLP (``expert_rank`` overrides it).
``router_kd``
    Only the routers are trained (weights and biases), by distillation from the unpruned model (Router-KD,
    arXiv 2603.02217): the unpruned model's next-token distribution on the windows is computed in one pass
    before pruning and kept as its top-``kd_top`` log-probabilities (never the teacher beside the student),
    then the loss is KL(teacher || student) over the teacher's top tokens,
    sum_k p_t(k) (log p_t(k) - log p_s(k)), both distributions renormalised over those tokens (ours: the
    top-k truncation, k = 16, and the learning rate 1e-3).
``full``
    Every parameter trained with the next-token loss (for tiny models; learning rate 1e-5, ours).

Half-precision models are trained with float32 master copies of the trained tensors (the model keeps its
dtype); LoRA adapters are float32 (PEFT's own rule). Gradient checkpointing is on for ``lora`` and ``full``.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, fields

import torch

from moebench.calib.sources import parse_calibration
from moebench.moe.view import MoEView

KINDS = ("lora", "router_kd", "full")
DEFAULT_LR = {"lora": 5e-5, "router_kd": 1e-3, "full": 1e-5}
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
REFUSED_KINDS = {"select": "an input-aware (select) method keeps every expert and chooses some per request: there is "
                           "no pruned model to train"}


@dataclass(frozen=True)
class RecoverSpec:
    """What a recovery stage does: its kind, data and training settings (plain values, as users give them)."""

    kind: str
    data: str
    steps: int = 100
    lr: float | None = None  # None: DEFAULT_LR[kind]
    rank: int = 8
    alpha: int = 16
    expert_rank: int | None = None  # None: max(1, round(rank * top_k / E)) per expert
    batch: int = 4
    seq_len: int | None = None  # None: min(2048, the model's positions)
    warmup: float = 0.03
    seed: int = 0
    kd_top: int = 16

    @classmethod
    def parse(cls, value, where: str = "recover") -> RecoverSpec:
        """From a mapping (a study's ``recover:``) or ``kind`` + keys; every problem named with the fix."""
        if isinstance(value, RecoverSpec):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{where}: give a mapping such as {{kind: lora, data: testbed:mix, steps: 200}}, "
                             f"not {str(value)[:60]!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(map(str, value)) - known)
        if unknown:
            from moebench.util import did_you_mean

            raise ValueError(f"{where}: unknown key {unknown[0]!r}{did_you_mean(unknown[0], known)}; keys: "
                             f"{', '.join(sorted(known))}")
        kind = str(value.get("kind", "")).strip().lower()
        if kind not in KINDS:
            raise ValueError(f"{where}: kind={value.get('kind')!r} must be one of {', '.join(KINDS)}")
        if not value.get("data"):
            raise ValueError(f"{where}: give the training data as a calibration source, e.g. data: testbed:mix")
        out = {"kind": kind, "data": str(value["data"])}
        for f in fields(cls):
            if f.name in out or f.name not in value or value[f.name] is None:
                continue
            out[f.name] = _number(value[f.name], f.name, where)
        spec = cls(**out)
        spec.check(where)
        return spec

    def check(self, where: str = "recover") -> None:
        """Refuse out-of-range settings, naming the value."""
        whole = {"steps": 1, "rank": 1, "alpha": 1, "batch": 1, "kd_top": 1, "seed": 0, "expert_rank": 1,
                 "seq_len": 2}
        for name, low in whole.items():
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < low):
                raise ValueError(f"{where}: {name}={value!r} must be a whole number >= {low}")
        if self.lr is not None and not (0 < self.lr < 1):
            raise ValueError(f"{where}: lr={self.lr!r} must be in (0, 1)")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"{where}: warmup={self.warmup!r} must be a fraction of the steps in [0, 1)")
        parse_calibration(self.data, 1, 2)  # an unknown source is named with suggestions

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.kind]

    def to_dict(self) -> dict:
        """The settings given (defaults left out, so identities do not change when a default is added)."""
        defaults = RecoverSpec(self.kind, self.data)
        return {k: v for k, v in asdict(self).items() if k in ("kind", "data") or v != getattr(defaults, k)}

    def label(self) -> str:
        """``lora on testbed:mix, 200 steps`` for tables and messages."""
        return f"{self.kind} on {self.data}, {self.steps} steps"


def _number(value, name: str, where: str):
    if name in ("lr", "warmup"):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: {name}={value!r} must be a number") from None
    if isinstance(value, bool):
        raise ValueError(f"{where}: {name}={value!r} must be a whole number")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {name}={value!r} must be a whole number") from None
    if str(value).strip() not in (str(number), f"{number}.0") and not isinstance(value, int):
        raise ValueError(f"{where}: {name}={value!r} must be a whole number")
    return number


def refusal(method_kind: str, skip: str, apply_mode: str) -> str | None:
    """Why a recovery stage cannot follow this method, or None."""
    if method_kind in REFUSED_KINDS:
        return f"recover: {REFUSED_KINDS[method_kind]}"
    if skip != "none":
        return ("recover: dynamic skipping's thresholds are measured on the model before training; recover a static "
                "method (skip=none)")
    if apply_mode != "physical":
        return "recover: apply=mask keeps every expert in memory; recovery trains the pruned model (apply=physical)"
    return None


def windows(model, tokenizer, spec: RecoverSpec) -> torch.Tensor:
    """The training windows ``[steps * batch, seq_len]`` of ``spec.data`` (packed like calibration, seeded)."""
    positions = getattr(MoEView(model).config, "max_position_embeddings", 2048) or 2048
    seq_len = spec.seq_len or min(2048, positions)
    return parse_calibration(spec.data, spec.steps * spec.batch, seq_len, spec.seed).tokens(tokenizer)


@torch.no_grad()
def teacher_targets(model, tokens: torch.Tensor, top: int = 16, batch: int = 4) -> dict[str, torch.Tensor]:
    """The model's top-``top`` next-token log-probabilities on ``tokens`` (renormalised over those tokens):
    ``{"ids": [N, T, top] int32, "logp": [N, T, top] float32}``, computed one batch at a time on the model's device
    and kept on the CPU: 8 bytes per position and kept token (1 MB for 4 windows of 2048 tokens at top 16)."""
    device = next(p.device for p in model.parameters() if not p.is_meta)
    ids, logps = [], []
    was_training = model.training
    model.eval()
    for start in range(0, len(tokens), batch):
        logits = model(input_ids=tokens[start:start + batch].to(device)).logits.float()
        values, index = logits.topk(min(top, logits.shape[-1]), dim=-1)
        logps.append(torch.log_softmax(values, dim=-1).cpu())
        ids.append(index.to(torch.int32).cpu())
    model.train(was_training)
    return {"ids": torch.cat(ids), "logp": torch.cat(logps)}


def cached_teacher_targets(model, tokenizer, spec: RecoverSpec, stats_dir: str | None, model_id: str | None,
                           revision: str | None = None, progress: bool = True) -> dict[str, torch.Tensor]:
    """`teacher_targets` of the (unpruned) ``model`` on the windows of ``spec``, kept in the statistics cache
    (``<stats dir>/<model>/<windows>/teacher-top<k>.pt``) and read from there when present and well formed."""
    import os
    import sys

    from moebench.calib.cache import default_stats_dir, model_key
    from moebench.util import atomic_write

    data = windows(model, tokenizer, spec)
    key = parse_calibration(spec.data, len(data), data.shape[1], spec.seed).key
    path = os.path.join(stats_dir or default_stats_dir(), model_key(model, model_id, revision), key,
                        f"teacher-top{spec.kd_top}.pt")
    if os.path.isfile(path):
        try:
            found = torch.load(path, weights_only=True)
            if found["ids"].shape[:2] == data.shape and found["logp"].shape == found["ids"].shape:
                if progress:
                    print(f"recover: the unpruned model's targets read from the cache {path}", file=sys.stderr)
                return found
        except Exception:  # a damaged file is computed again and replaced
            pass
    targets = teacher_targets(model, data, spec.kd_top, spec.batch)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(targets, tmp))
    if progress:
        print(f"recover: the unpruned model's targets computed and cached in {path}", file=sys.stderr)
    return targets


def recover(model, tokenizer, spec: RecoverSpec, targets: dict | None = None, progress: bool = True):
    """Train ``model`` in place as ``spec`` says; returns ``(model, record)``.

    ``targets``: the unpruned model's `teacher_targets` on `windows` (``router_kd`` only). The returned model is
    the same object for ``router_kd`` and ``full``, and the merged base model for ``lora``.
    """
    start = time.perf_counter()
    data = windows(model, tokenizer, spec)
    if spec.kind == "router_kd" and (targets is None or targets["ids"].shape[:2] != data.shape):
        raise ValueError("recover kind=router_kd needs the unpruned model's targets on the same windows "
                         "(teacher_targets before pruning)")
    device = next(p.device for p in model.parameters() if not p.is_meta)
    torch.manual_seed(spec.seed)
    peft_model, expert_rank = None, None
    if spec.kind == "lora":
        peft_model, expert_rank = _with_lora(model, spec)
        trained = [p for p in peft_model.parameters() if p.requires_grad]
        net = peft_model
    else:
        for p in model.parameters():
            p.requires_grad_(spec.kind == "full")
        if spec.kind == "router_kd":
            for layer in MoEView(model).layers:
                for tensor, _ in layer.router_tensors().values():
                    if isinstance(tensor, torch.nn.Parameter):
                        tensor.requires_grad_(True)
        trained = [p for p in model.parameters() if p.requires_grad]
        net = model
    if not trained:
        raise ValueError(f"recover kind={spec.kind}: the model has no parameter this kind trains")
    checkpointing = spec.kind in ("lora", "full")
    if checkpointing:
        _checkpointing(model, True)
    net.train()
    losses = _train(net, trained, data, targets, spec, device, progress)
    net.eval()
    if checkpointing:
        _checkpointing(model, False)
    if peft_model is not None:
        model = peft_model.merge_and_unload()
    for p in model.parameters():
        p.requires_grad_(False)
    record = {**asdict(spec), "lr": spec.learning_rate, "expert_rank": expert_rank,
              "trained_parameters": sum(p.numel() for p in trained),
              "windows": list(data.shape), "loss_first": losses[0], "loss_last": losses[-1],
              "loss_first_tenth": _mean(losses[: max(1, len(losses) // 10)]),
              "loss_last_tenth": _mean(losses[-max(1, len(losses) // 10):]),
              "seconds": round(time.perf_counter() - start, 3)}
    if device.type == "cuda":
        record["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return model, record


def _checkpointing(model, on: bool) -> None:
    """Gradient (activation) checkpointing on or off, through whichever name this transformers gives it."""
    for prefix in ("activation", "gradient"):
        method = getattr(model, f"{prefix}_checkpointing_{'enable' if on else 'disable'}", None)
        if method is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                method(**{f"{prefix}_checkpointing_kwargs": {"use_reentrant": False}}) if on else method()
            return


def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values))


def _with_lora(model, spec: RecoverSpec):
    """``(the model wrapped by PEFT with LoRA on the attention projections and the fused expert tensors, the rank
    per expert)``."""
    from peft import LoraConfig, get_peft_model

    view = MoEView(model)
    modules = sorted({name.rsplit(".", 1)[-1] for name, _ in model.named_modules()} & set(ATTENTION))
    layers = view.layers
    expert_names = sorted({f"{layer.family.block}.{layer.family.experts}.{name}" for layer in layers
                           for name, t in layer.expert_tensors().items() if isinstance(t, torch.nn.Parameter)})
    per_expert = spec.expert_rank or max(1, round(spec.rank * view.top_k / max(1, layers[0].num_experts)))
    pattern = dict.fromkeys(expert_names, per_expert)
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=0.0, target_modules=modules or None,
                        target_parameters=expert_names or None, rank_pattern=pattern, bias="none")
    with warnings.catch_warnings():  # PEFT checks rank_pattern against target_modules only, and warns
        warnings.filterwarnings("ignore", message="The following rank_pattern keys did not match")
        return get_peft_model(model, config), (per_expert if expert_names else None)


def _train(net, trained: list[torch.nn.Parameter], data: torch.Tensor, targets: dict | None, spec: RecoverSpec,
           device: torch.device, progress: bool) -> list[float]:
    """AdamW with a cosine schedule after a linear warm-up; float32 master copies of half-precision tensors."""
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    from moebench.util import on_terminal

    masters = [p.detach().float().clone().requires_grad_(True) if p.dtype != torch.float32 else p for p in trained]
    optimizer = torch.optim.AdamW(masters, lr=spec.learning_rate, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, math.ceil(spec.warmup * spec.steps), spec.steps)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(spec.seed))
    losses = []
    bar = tqdm(range(spec.steps), desc=f"recover ({spec.kind})", disable=not (progress and on_terminal()))
    for step in bar:
        rows = order[step * spec.batch:(step + 1) * spec.batch]
        ids = data[rows].to(device)
        if spec.kind == "router_kd":
            logits = net(input_ids=ids).logits.float()
            teacher_ids = targets["ids"][rows].to(device).long()
            teacher = targets["logp"][rows].to(device)
            student = torch.log_softmax(logits.gather(-1, teacher_ids), dim=-1)  # over the teacher's top tokens
            loss = (teacher.exp() * (teacher - student)).sum(-1).mean()
        else:
            loss = net(input_ids=ids, labels=ids).loss
        loss.backward()
        for param, master in zip(trained, masters, strict=True):
            if master is not param:
                master.grad = None if param.grad is None else param.grad.float()
                param.grad = None
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for param, master in zip(trained, masters, strict=True):
                if master is not param:
                    param.copy_(master.to(param.dtype))
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return losses
