"""Expert offloading: routed experts live in CPU memory; a per-layer working set on the compute device.

`ExpertOffloader(model)` (or `ExpertOffloader.onto(model_in_host_memory, device)`, which moves only the
rest of the model to the device) moves every routed expert tensor ``[E, ...]`` of every MoE layer into a CPU
store (pinned when CUDA is present) and leaves an empty placeholder on the module, so the model's
resident expert bytes are only the working sets. It switches the model to moebench's kernel (`close`
gives the previous one back), which reads expert weights from the attached provider
(`moebench.moe.kernels.PROVIDER_ATTR`) instead of the module's parameters.

Inside ``with offloader.batch(keeps):`` (one selection per batch row; None = unknown) each MoE
layer's working set becomes the union of the rows' kept experts: on entry to layer l its missing
experts are copied in (experts outside the union are evicted), and layer l+1's are prefetched while
l computes (a side CUDA stream when the device is CUDA; synchronous copies on CPU). An expert the
kernel needs but that is not resident (no selection known) is fetched on demand, except inside
``cpu_side_pass()`` (the selection's signature pass over the context), where it runs on its CPU copy.

Counters (`counters`, JSON data): ``resident_bytes`` now and ``resident_bytes_peak``,
``bytes_moved``, ``hits`` (needed experts already resident) and ``fetches`` (copied in: ``prefetched``
while the previous layer runs, ``at_entry`` of their layer, ``on_demand`` inside the kernel),
``hit_rate`` = hits / (hits + fetches).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from moebench.moe.kernels import PROVIDER_ATTR, expert_forward, restore_kernel, switch_to_kernel
from moebench.moe.ops import _replace_tensor
from moebench.moe.view import MoEError, MoELayer, MoEView


class _LayerStore:
    """One layer's experts: the CPU store ``{name: [E, ...]}`` and the device-resident working set."""

    def __init__(self, layer: MoELayer, device: torch.device, owner: ExpertOffloader):
        self.layer, self.device, self.owner = layer, device, owner
        pin = device.type == "cuda"
        self.cpu = {name: (t.detach().cpu().pin_memory() if pin else t.detach().cpu())
                    for name, t in layer.expert_tensors().items()}
        self.n_experts = layer.num_experts
        self.expert_bytes = sum(t[0].numel() * t.element_size() for t in self.cpu.values())
        self.resident: dict[int, dict[str, torch.Tensor]] = {}
        self.ready: torch.cuda.Event | None = None

    def _copy(self, e: int, non_blocking: bool, consumer=None) -> dict[str, torch.Tensor]:
        out = {name: t[e].to(self.device, non_blocking=non_blocking, copy=True) for name, t in self.cpu.items()}
        if consumer is not None:  # made on the side stream, read on the compute stream: the allocator must not
            for t in out.values():  # hand the memory out again before that stream is done with it
                t.record_stream(consumer)
        self.owner._moved(self.expert_bytes)
        return out

    def make_resident(self, ids: set[int], kind: str) -> None:
        """Working set := ``ids``: evict the others, copy in the missing ones (counted as ``kind``)."""
        for e in [e for e in self.resident if e not in ids]:
            del self.resident[e]
            self.owner._resident(-self.expert_bytes)
        stream = self.owner.stream_for(self.device)
        compute = torch.cuda.current_stream(self.device) if stream is not None else None
        for e in sorted(ids):
            if e in self.resident:
                self.owner.counters["hits"] += 1
                continue
            if stream is not None:
                with torch.cuda.stream(stream):
                    self.resident[e] = self._copy(e, non_blocking=True, consumer=compute)
            else:
                self.resident[e] = self._copy(e, non_blocking=False)
            self.owner._resident(self.expert_bytes)
            self.owner.counters["fetches"] += 1
            self.owner.counters[kind] += 1
        if stream is not None:
            self.ready = torch.cuda.Event()
            self.ready.record(stream)

    def forward(self, experts, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on ``x [n, H]``; outside the working set in a CPU-side pass: computed on the CPU copy."""
        if self.owner.cpu_side and e not in self.resident:
            self.owner.counters["cpu_computed"] += 1
            weights = {name: t[e] for name, t in self.cpu.items()}
            return expert_forward(experts, e, x.to("cpu"), weights).to(x.device)
        return expert_forward(experts, e, x, self.get(e))

    def get(self, e: int) -> dict[str, torch.Tensor]:
        """Expert ``e``'s tensors on the device (fetched on demand when not resident)."""
        if self.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready)
            self.ready = None
        if e not in self.resident:
            self.resident[e] = self._copy(e, non_blocking=False)
            self.owner._resident(self.expert_bytes)
            self.owner.counters["fetches"] += 1
            self.owner.counters["on_demand"] += 1
        return self.resident[e]


class ExpertOffloader:
    """Keeps routed experts in CPU memory and streams them to the compute device layer by layer."""

    def __init__(self, model, device: torch.device | str | None = None):
        self.model = model
        self.view = MoEView(model)
        if not all(layer.family.experts_slot for layer in self.view.layers):
            raise MoEError(f"offloading needs the experts-implementation slot; {self.view.family.name} has none")
        # each layer computes where its experts are (a model spread over several GPUs keeps every layer's own)
        self.device = torch.device(device) if device else None
        self.streams: dict[torch.device, torch.cuda.Stream] = {}
        self.counters = {"resident_bytes": 0, "resident_bytes_peak": 0, "bytes_moved": 0, "hits": 0,
                         "fetches": 0, "prefetched": 0, "at_entry": 0, "on_demand": 0, "cpu_computed": 0,
                         "hit_rate": None, "unpruned_expert_bytes": self.view.expert_bytes()}
        self.stores = []
        for layer in self.view.layers:
            where = self.device or next(iter(layer.expert_tensors().values())).device
            store = _LayerStore(layer, where, self)
            for name in store.cpu:
                _replace_tensor(layer.experts, name, torch.empty(0, device=where))
            setattr(layer.experts, PROVIDER_ATTR, store)
            self.stores.append(store)
        self.wanted: list[set[int]] | None = None
        self.cpu_side = False
        self.entered: set[int] = set()
        self.hooks = [layer.block.register_forward_pre_hook(self._enter_hook(n))
                      for n, layer in enumerate(self.view.layers)]
        switch_to_kernel(model)

    @classmethod
    def onto(cls, model, device: torch.device | str) -> ExpertOffloader:
        """Offload a model loaded in host memory onto ``device``: its routed experts become the host store
        (pinned where CUDA is present) and only the rest (attention, routers, shared experts, embeddings) moves
        to ``device``; the device never holds the whole model (a model larger than the GPU loads this way)."""
        offloader = cls(model, device)
        model.to(device)  # the experts are empty placeholders by now: only the rest moves
        return offloader

    def stream_for(self, device: torch.device):
        """The side stream copies to ``device`` run on (None off CUDA)."""
        if device.type != "cuda":
            return None
        if device not in self.streams:
            self.streams[device] = torch.cuda.Stream(device)
        return self.streams[device]

    def _moved(self, nbytes: int) -> None:
        self.counters["bytes_moved"] += nbytes

    def _resident(self, delta: int) -> None:
        c = self.counters
        c["resident_bytes"] += delta
        c["resident_bytes_peak"] = max(c["resident_bytes_peak"], c["resident_bytes"])
        seen = c["hits"] + c["fetches"]
        c["hit_rate"] = c["hits"] / seen if seen else None

    def _enter_hook(self, n: int):
        def hook(module, args):
            if self.wanted is None:
                return
            if n not in self.entered:  # once per batch, not once per decode step
                self.entered.add(n)
                self.stores[n].make_resident(self.wanted[n], "at_entry")
            if n + 1 < len(self.stores) and n + 1 not in self.entered:
                self.entered.add(n + 1)
                self.stores[n + 1].make_resident(self.wanted[n + 1], "prefetched")
        return hook

    @contextmanager
    def batch(self, keeps: list[dict[int, list[int]]] | None):
        """Within the block, each layer's working set is the union of the rows' kept experts."""
        if keeps is not None:
            self.wanted = [set().union(*(set(k.get(s.layer.index, range(s.n_experts))) for k in keeps))
                           for s in self.stores]
        self.entered = set()
        try:
            yield self
        finally:
            self.wanted, self.entered = None, set()
            self._resident(0)

    @contextmanager
    def cpu_side_pass(self):
        """Within the block, experts outside the working sets run on their CPU copies (nothing moved).

        For the selection's signature pass, which runs the unpruned model on the context.
        """
        self.cpu_side = True
        try:
            yield self
        finally:
            self.cpu_side = False

    @property
    def host_bytes(self) -> int:
        """Bytes of the experts held in host memory (the store; pinned where CUDA is present)."""
        return sum(t.numel() * t.element_size() for store in self.stores for t in store.cpu.values())

    def close(self) -> None:
        """Put every expert tensor back on the module (on the compute device), detach, and give the model
        back the experts kernel it had before offloading (unless skipping still needs moebench's)."""
        for hook in self.hooks:
            hook.remove()
        for store in self.stores:
            for name, t in store.cpu.items():
                _replace_tensor(store.layer.experts, name, t.to(store.device))
            delattr(store.layer.experts, PROVIDER_ATTR)
            store.cpu, store.resident = {}, {}  # the (pinned) host store is released
        self.stores = []
        restore_kernel(self.model)
