"""Method and Plan: the plugin interface, budgets, plans, and applying a plan to a model.

Lives here: `registry` (decorators `score_method` / `planner`, parameters, the method registry),
`plan` (`Plan`, pure data, JSON), `pipeline` (model + request -> statistics -> method -> Plan, the
one path every front end uses), `apply` (`apply(model, plan)`: the one verb that puts a plan in
effect) and `select` (per-input selectors of select plans). The plugins themselves are
`moebench.methods`. Imports `moebench.calib`, `moebench.moe` and `moebench.util`.

    from moebench.method import score_method

    @score_method("my_score", needs=("norms",), paper="Me et al. 2026")
    def my_score(ctx, layer, *, alpha: float = 1.0): ...
"""

from moebench.method.plan import Plan
from moebench.method.registry import (
    MethodSpec,
    PlanContext,
    get_method,
    load_methods,
    planner,
    resolve_budget,
    score_method,
    select_top,
)

__all__ = ["MethodSpec", "Plan", "PlanContext", "get_method", "load_methods", "planner", "resolve_budget",
           "score_method", "select_top"]
