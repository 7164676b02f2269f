"""Registers the ``pruned_moe`` model in lm-eval's model registry.

lm-eval 0.4.13 finds models only in its own registry and has no plugin discovery. `register` is
called by the start-up hook (the top-level module ``moebench_lm_eval_hook``, run through the
``.pth`` file the install ships) right after lm-eval's registry is imported, by the
``moebench lm-eval`` shim, and on import of `moebench.eval.model`.

`register` first imports ``lm_eval.models``: lm-eval loads its built-in table only while the
registry is empty, so registering into an empty registry first would hide ``hf`` and the rest.
It then adds ``pruned_moe`` as a lazy entry-point placeholder, the same object that lm-eval
releases with entry-point discovery (group ``lm_eval.models``) register, so the two never
collide. Nothing heavy is imported until the model is asked for.
"""

from __future__ import annotations

MODEL_NAME = "pruned_moe"
MODEL_TARGET = "moebench.eval.model:PrunedMoELM"
ENTRY_POINT_GROUP = "lm_eval.models"


def entry_point():
    """The entry point that names the model class (as declared in pyproject.toml)."""
    from importlib.metadata import EntryPoint

    return EntryPoint(name=MODEL_NAME, value=MODEL_TARGET, group=ENTRY_POINT_GROUP)


def register() -> None:
    """Add ``pruned_moe`` to lm-eval's model registry (idempotent; built-in models stay)."""
    import lm_eval.models  # noqa: F401  (fills the registry with hf, vllm, ... first)
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=entry_point())


def add_task_folder() -> None:
    """Make every lm-eval ``TaskManager`` also index moebench's packaged tasks (idempotent).

    lm-eval has no discovery for task folders; without this, its command line needs
    ``--include_path`` for the testbed tasks. The folder is added only when the caller keeps
    lm-eval's default tasks (``include_defaults=True``) and did not pass it already.
    """
    import functools
    import inspect
    import os

    from lm_eval.tasks import TaskManager

    original = TaskManager.__init__
    if getattr(original, "_moebench_tasks", False):
        return
    signature = inspect.signature(original)

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        from moebench.tasks import task_dir

        bound = signature.bind(self, *args, **kwargs)
        if bound.arguments.get("include_defaults", True):
            given = bound.arguments.get("include_path")
            paths = [] if given is None else [given] if isinstance(given, (str, os.PathLike)) else list(given)
            ours = os.path.realpath(task_dir())
            if all(os.path.realpath(p) != ours for p in paths):
                bound.arguments["include_path"] = [*paths, task_dir()]
        original(*bound.args, **bound.kwargs)

    __init__._moebench_tasks = True
    TaskManager.__init__ = __init__
