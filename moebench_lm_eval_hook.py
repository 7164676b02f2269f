"""Start-up hook that makes lm-eval 0.4.13 know moebench's ``pruned_moe`` model and task folder.

``moebench_lm_eval.pth`` (shipped by the install, see ``moebench/_packaging.py``) imports this
module and calls `install` at every interpreter start. It is a top-level module, not part of the
``moebench`` package, and imports ``sys`` only: a process that never imports lm-eval never
imports moebench. The finder below waits on ``sys.meta_path`` for ``lm_eval.api.registry``; once
that module has run, ``moebench.eval.plugin.register`` adds the model; once ``lm_eval.tasks``
has run, ``add_task_folder`` makes its ``TaskManager`` index moebench's tasks (the testbed tasks
then need no ``--include_path``). The finder and loader
follow the import protocol without the ``importlib.abc`` bases, whose import costs more than
this whole module.
"""

from __future__ import annotations

import sys

TRIGGER = "lm_eval.api.registry"
TASKS_TRIGGER = "lm_eval.tasks"


def _register() -> None:
    from moebench.eval.plugin import register

    register()


def _add_tasks() -> None:
    from moebench.eval.plugin import add_task_folder

    add_task_folder()


HOOKS = {TRIGGER: (_register, "register the lm-eval model 'pruned_moe'"),
         TASKS_TRIGGER: (_add_tasks, "add its task folder to lm-eval")}


class _AfterExec:
    """Wraps a module's loader and calls its hook once the module has run."""

    def __init__(self, loader, name):
        self.loader, self.name = loader, name

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        _run(self.name)

    def __getattr__(self, name):  # get_source, get_code, is_package, ... of the real loader
        return getattr(self.loader, name)


def _run(name: str) -> None:
    hook, what = HOOKS[name]
    try:
        hook()
    except Exception as err:  # never break lm-eval itself; say what moebench could not do
        import warnings

        warnings.warn(f"moebench could not {what}: {err!r}", RuntimeWarning, stacklevel=3)


class _ImportWatcher:
    """A finder that runs each hook once, right after its lm-eval module is imported."""

    def __init__(self, names):
        self.pending = set(names)

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.pending:
            return None
        self.pending.discard(fullname)
        from importlib.util import find_spec

        sys.meta_path.remove(self)  # let the real finders answer (and never ask this one again for it)
        try:
            spec = find_spec(fullname)  # the finders after this one, whichever installed lm-eval
        finally:
            if self.pending:
                sys.meta_path.insert(0, self)
        if spec is not None and spec.loader is not None:
            spec.loader = _AfterExec(spec.loader, fullname)
        return spec


def install() -> None:
    """Run the hooks for lm-eval modules already imported; watch for the others in this process."""
    if any(isinstance(finder, _ImportWatcher) for finder in sys.meta_path):
        return
    waiting = []
    for name in HOOKS:
        if name in sys.modules:
            _run(name)
        else:
            waiting.append(name)
    if waiting:
        sys.meta_path.insert(0, _ImportWatcher(waiting))
