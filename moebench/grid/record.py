"""What every cell records about itself, whichever backend scored it: portable paths and moebench's versions."""

from __future__ import annotations

import os
import platform
import subprocess


def portable(data, prefixes: list[tuple[str, str]] | None = None):
    """``data`` with the paths of this installation (moebench's tasks and package folders) written as
    ``<moebench.tasks>`` and ``<moebench>``, so results do not depend on where moebench is installed."""
    if prefixes is None:
        import moebench
        from moebench.tasks import task_dir

        folders = [(task_dir(), "<moebench.tasks>"), (os.path.dirname(moebench.__file__), "<moebench>")]
        prefixes = list(dict.fromkeys((norm(path), name) for path, name in folders
                                      for norm in (os.path.realpath, os.path.abspath)))
    if isinstance(data, dict):
        return {k: portable(v, prefixes) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [portable(v, prefixes) for v in data]
    if isinstance(data, str):
        for prefix, name in prefixes:
            if data == prefix or data.startswith(prefix + os.sep):
                return name + data[len(prefix):]
    return data


def moebench_environment() -> dict:
    """moebench's version, its git sha (when run from a clone) and the Python of this process."""
    import moebench

    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(moebench.__file__),
                             capture_output=True, text=True, timeout=10).stdout.strip() or None
    except OSError:
        sha = None
    return {"moebench_version": moebench.__version__, "git_sha": sha, "python": platform.python_version()}
