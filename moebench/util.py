"""Small helpers every layer uses: "did you mean" suggestions, atomic writes, extension plugins.

Standard library only; the bottom of the import order (nothing in moebench is imported here).
"""

from __future__ import annotations

import difflib
import importlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterable
from importlib.metadata import entry_points

PLUGIN_GROUP = "moebench.plugins"
_PLUGINS_LOADED = False


def close_matches(name: str, choices: Iterable[str], n: int = 1, cutoff: float = 0.6) -> list[str]:
    """The up to ``n`` entries of ``choices`` closest to ``name`` (difflib's ratio >= ``cutoff``)."""
    return difflib.get_close_matches(str(name), [str(c) for c in choices], n=n, cutoff=cutoff)


def did_you_mean(name: str, choices: Iterable[str], n: int = 1, cutoff: float = 0.6) -> str:
    """``" (did you mean 'x'?)"`` for the closest of ``choices``, or ``""`` when none is close."""
    close = close_matches(name, choices, n, cutoff)
    return f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""


def on_terminal() -> bool:
    """Whether stderr, where progress bars go, is a terminal. Inner bars (per batch, per tensor)
    are shown only there: redirected to a log, each update would add to the file."""
    stream = getattr(sys, "stderr", None)
    return bool(stream is not None and hasattr(stream, "isatty") and stream.isatty())


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it to ``path``.

    Readers see the old file or the complete new one, never a partial one. When ``write`` fails
    (a full disk, say) the temporary file is removed and the error is raised again, naming the
    folder when it is a disk-full error.
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(err, OSError) and err.errno == 28:  # ENOSPC
            raise OSError(err.errno, f"no space left on the device holding {folder} while writing "
                                     f"{os.path.basename(path)}; free space there and run again") from err
        raise


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see `atomic_write`)."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


def atomic_write_json(path: str, data, **dump_kwargs) -> None:
    """Write ``data`` as JSON (indent 2, sorted keys unless given) to ``path`` atomically."""
    options = {"indent": 2, "sort_keys": True, "default": str, **dump_kwargs}
    atomic_write_text(path, json.dumps(data, **options))


def load_plugins() -> None:
    """Import every module named by an entry point of group ``moebench.plugins`` (once per process).

    A plugin module registers what it provides on import: model names (`moebench.moe.checkpoint.
    register_models`), calibration sources (`moebench.calib.sources.register_source`). The embedded
    testbed is such a plugin; core modules never import it.
    """
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True
    for ep in entry_points(group=PLUGIN_GROUP):
        importlib.import_module(ep.value.split(":")[0])
