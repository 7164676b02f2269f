"""Start-up hook that makes lm-eval 0.4.13 know moebench's ``pruned_moe`` model.

``moebench_lm_eval.pth`` (shipped by the install, see ``moebench/_packaging.py``) imports this
module and calls `install` at every interpreter start. It is a top-level module, not part of the
``moebench`` package, and imports ``sys`` only: a process that never imports lm-eval never
imports moebench. The finder below waits on ``sys.meta_path`` for ``lm_eval.api.registry``; once
that module has run, ``moebench.lm_eval_plugin.register`` adds the model. The finder and loader
follow the import protocol without the ``importlib.abc`` bases, whose import costs more than
this whole module.
"""

from __future__ import annotations

import sys

TRIGGER = "lm_eval.api.registry"


def _register() -> None:
    from moebench.lm_eval_plugin import register

    register()


class _AfterExec:
    """Wraps a module's loader and calls `_register` once the module has run."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        try:
            _register()
        except Exception as err:  # never break lm-eval itself; say why pruned_moe is missing
            import warnings

            warnings.warn(f"moebench could not register the lm-eval model 'pruned_moe': {err!r}",
                          RuntimeWarning, stacklevel=2)

    def __getattr__(self, name):  # get_source, get_code, is_package, ... of the real loader
        return getattr(self.loader, name)


class _RegistryWatcher:
    """A one-shot finder: when lm-eval's registry is imported, run `_register` after it."""

    def find_spec(self, fullname, path, target=None):
        if fullname != TRIGGER:
            return None
        sys.meta_path.remove(self)
        from importlib.util import find_spec

        spec = find_spec(fullname)  # the finders after this one, whichever installed lm-eval
        if spec is not None and spec.loader is not None:
            spec.loader = _AfterExec(spec.loader)
        return spec


def install() -> None:
    """Make lm-eval's registry know ``pruned_moe`` whenever it is imported in this process."""
    if TRIGGER in sys.modules:
        _register()
    elif not any(isinstance(finder, _RegistryWatcher) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegistryWatcher())
