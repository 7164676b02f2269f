"""Memory figures of one model in this process, each measured or computed as its name says.

- **resident weights** (`resident_bytes`, computed): bytes of the model's parameters and buffers as
  they are after the method, routed experts and the rest, per device; experts held by an offloader
  in host memory are counted apart (``host_expert_bytes``).
- **load peak** (measured): the high-water mark from the start of the process (CPU) or of CUDA's
  allocator through loading, planning and applying the method.
- **run peak** (measured): the high-water mark from just after the method is applied (the peak is
  reset there) to the end of evaluation and of the variant's own timed pass.

On a CPU the figure is the process's own peak resident set: ``VmHWM`` in ``/proc/self/status``
(reset by ``exec``, so a cell process never reports its parent's; ``ru_maxrss`` is kept across
``exec`` on Linux and would), reset by writing ``5`` to ``/proc/self/clear_refs`` (which sets it to
the current resident set). Before the reset, freed heap is handed back to the system
(``gc.collect`` + glibc ``malloc_trim``) so the removed experts do not stay counted. On CUDA: bytes
allocated by torch (``max_memory_allocated``), summed over every device the model uses; the reset
synchronises, empties the cache and resets each device's peak.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import resource
import sys

import torch
from torch import nn

STATUS = "/proc/self/status"
CLEAR_REFS = "/proc/self/clear_refs"


def _status_kib(field: str) -> int | None:
    try:
        with open(STATUS) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def host_peak_bytes() -> tuple[int, str]:
    """``(bytes, source)``: this process's peak resident set; ``source`` is ``VmHWM`` or, where the
    kernel has no ``/proc`` (not Linux), ``ru_maxrss`` (which may include a parent's peak)."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024, "VmHWM"
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, "ru_maxrss"


def release_freed_host_memory() -> None:
    """Collect garbage and hand freed heap back to the system (glibc ``malloc_trim``; no-op elsewhere)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_host_peak() -> bool:
    """Set this process's peak resident set to its current one; False where the kernel does not allow it."""
    try:
        with open(CLEAR_REFS, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def model_devices(model: nn.Module) -> list[torch.device]:
    """The devices holding the model's parameters and buffers, sorted (meta left out)."""
    found = {t.device for t in list(model.parameters()) + list(model.buffers()) if t.device.type != "meta"}
    return sorted(found, key=str)


def cuda_devices(devices) -> list[torch.device]:
    """The CUDA devices among ``devices``, each with its index (``cuda`` alone means the current one)."""
    out = []
    for d in devices:
        d = torch.device(d)
        if d.type == "cuda":
            out.append(torch.device("cuda", d.index if d.index is not None else torch.cuda.current_device()))
    return sorted(set(out), key=str)


def device_peak_bytes(devices) -> int:
    """Peak bytes allocated by torch, summed over the CUDA devices among ``devices``."""
    total = 0
    for d in cuda_devices(devices):
        torch.cuda.synchronize(d)
        total += torch.cuda.max_memory_allocated(d)
    return total


def reset_device_peaks(devices) -> None:
    """Synchronise, empty the allocator cache and reset the peak of each CUDA device among ``devices``."""
    for d in cuda_devices(devices):
        torch.cuda.synchronize(d)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(d)


def resident_bytes(model: nn.Module, host_expert_bytes: int = 0) -> dict:
    """Computed resident weight bytes: ``expert_bytes`` (routed experts on the model's devices),
    ``other_bytes`` (everything else), ``weight_bytes`` (their sum), ``host_expert_bytes`` (experts an
    offloader keeps in host memory, given by the caller) and ``by_device`` {device: {experts, other}}.

    Tensors shared between modules (tied embeddings) count once.
    """
    from moebench.moe.view import MoEView

    try:
        expert_ids = {id(t) for layer in MoEView(model).layers for t in layer.expert_tensors().values()}
    except ValueError:  # a dense model (possible for method none)
        expert_ids = set()
    seen, by_device = set(), {}
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen or t.device.type == "meta":
            continue
        seen.add(id(t))
        slot = by_device.setdefault(str(t.device), {"experts": 0, "other": 0})
        slot["experts" if id(t) in expert_ids else "other"] += t.numel() * t.element_size()
    experts = sum(v["experts"] for v in by_device.values())
    other = sum(v["other"] for v in by_device.values())
    return {"expert_bytes": experts, "other_bytes": other, "weight_bytes": experts + other,
            "host_expert_bytes": int(host_expert_bytes), "by_device": dict(sorted(by_device.items()))}


class MemoryMeter:
    """Load peak and run peak of one model in this process (see the module docstring).

    ``devices``: where the model lives. On CUDA the figures are torch's allocated bytes summed over
    those devices; otherwise the process's peak resident set. Call `end_load` right after the method
    is applied (it reads the load peak and starts the run window), then `run_peak` at the end.
    """

    def __init__(self, devices):
        self.devices = cuda_devices(devices)
        self.load_peak: int | None = None
        self.source = None
        self.reset_ok = True

    def _peak(self) -> int:
        if self.devices:
            return device_peak_bytes(self.devices)
        value, self.source = host_peak_bytes()
        return value

    def end_load(self) -> int:
        """Read the load peak, then start the run window: freed memory is released and the peak reset."""
        self.load_peak = self._peak()
        if self.devices:
            reset_device_peaks(self.devices)
        else:
            release_freed_host_memory()
            self.reset_ok = reset_host_peak()
        return self.load_peak

    def run_peak(self) -> int | None:
        """The peak since `end_load`; None where the peak could not be reset (it would be the load's)."""
        if self.load_peak is None:
            raise RuntimeError("MemoryMeter.run_peak before end_load: the run window was never started")
        return self._peak() if self.reset_ok else None

    def describe(self) -> dict:
        """What the figures measure, for the results: ``memory_measure`` and (CPU) its source."""
        if self.devices:
            return {"memory_measure": "cuda_allocated", "memory_devices": [str(d) for d in self.devices]}
        return {"memory_measure": f"host_rss ({self.source or 'VmHWM'})"}
