"""Registers the ``pruned_moe`` model with lm-eval, for every way lm-eval is started.

lm-eval 0.4.13 finds models only in its own registry and has no plugin discovery, so the literal
``lm_eval --model pruned_moe`` needs moebench to register itself when lm-eval's registry is
imported. A ``.pth`` file shipped by the install (see `moebench._packaging`) calls
`install_import_hook` at interpreter start. The hook imports nothing: it waits on ``sys.meta_path``
for ``lm_eval.api.registry`` and, once that module has run, calls `register`.

`register` first imports ``lm_eval.models`` (its built-in table is loaded only while the registry
is empty; registering into an empty registry first would hide ``hf`` and the rest), then adds
``pruned_moe`` as a lazy entry-point placeholder, the same object that lm-eval releases with
entry-point discovery (group ``lm_eval.models``) register, so the two mechanisms never collide.
Nothing heavy is imported until the model is asked for.

This module runs in every Python process of the environment: it imports ``sys`` only (the
finder and loader below follow the import protocol without the ``importlib.abc`` bases, whose
import costs more than the rest of this module).
"""

from __future__ import annotations

import sys
import warnings

MODEL_NAME = "pruned_moe"
MODEL_TARGET = "moebench.lm_eval_model:PrunedMoELM"
ENTRY_POINT_GROUP = "lm_eval.models"
TRIGGER = "lm_eval.api.registry"


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


class _AfterExec:
    """Wraps a module's loader and calls `register` once the module has run."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        try:
            register()
        except Exception as err:  # never break lm-eval itself; say why pruned_moe is missing
            warnings.warn(f"moebench could not register the lm-eval model {MODEL_NAME!r}: {err!r}",
                          RuntimeWarning, stacklevel=2)

    def __getattr__(self, name):  # get_source, get_code, is_package, ... of the real loader
        return getattr(self.loader, name)


class _RegistryWatcher:
    """A one-shot finder: when lm-eval's registry is imported, run `register` after it."""

    def find_spec(self, fullname, path, target=None):
        if fullname != TRIGGER:
            return None
        sys.meta_path.remove(self)
        from importlib.util import find_spec

        spec = find_spec(fullname)  # the finders after this one, whichever installed lm-eval
        if spec is not None and spec.loader is not None:
            spec.loader = _AfterExec(spec.loader)
        return spec


def install_import_hook() -> None:
    """Make lm-eval's registry know ``pruned_moe`` whenever it is imported in this process."""
    if TRIGGER in sys.modules:
        register()
    elif not any(isinstance(finder, _RegistryWatcher) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegistryWatcher())
