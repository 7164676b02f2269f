"""The MoE view: an architecture-neutral view over transformers >= 5 MoE models, and what acts on it.

Lives here: the families table (`families`: one row of architecture facts per family), the view
(`view`: MoE layers, routers, fused expert tensors), operations on it (`ops`: validate, prune, mask),
the experts kernel (`kernels`), dynamic skipping (`skipping`), expert offloading (`offload`), MoNE's
constant novice experts (`novice`) and
loading / saving checkpoints (`checkpoint`). The bottom of moebench: imports only `moebench.util`.

    from moebench.moe import MoEView, mask, prune, unmask
"""

from moebench.moe.ops import mask, prune, unmask, validate_keep
from moebench.moe.view import MoEError, MoELayer, MoEView, Routing

__all__ = ["MoEError", "MoELayer", "MoEView", "Routing", "mask", "prune", "unmask", "validate_keep"]
