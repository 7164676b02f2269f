"""lm-eval integration: the ``pruned_moe`` model, its validated arguments and its registration.

Lives here: `model` (`PrunedMoELM`, an HFLM subclass), `args` (the model_args split and checked into
`PrunedMoESettings`), `select` (per-request selection for select methods) and `plugin` (registers
``pruned_moe`` and the task folder with lm-eval). Imports `moebench.method` and below.
"""
