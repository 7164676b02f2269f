"""Small helpers every layer uses: "did you mean" suggestions, names that become paths, atomic
writes of files and folders, extension plugins.

Standard library only; the bottom of the import order (nothing in moebench is imported here).
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import importlib
import json
import os
import re
import shutil
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


NAME_RULE = r"^[A-Za-z0-9._-]+$"


def check_name(value, what: str = "name") -> str:
    """``value`` if it may become one folder name: letters, digits, ``.``, ``_``, ``-``, not ``.`` or ``..``.

    Anything else (a ``/``, ``..``, an absolute path, markup, a number from YAML) raises ValueError
    naming the value, the rule and a name that would do.
    """
    if isinstance(value, str) and re.fullmatch(NAME_RULE, value) and value not in (".", ".."):
        return value
    suggestion = re.sub(r"[^A-Za-z0-9._-]+", "-", str(value)).strip("-.") or "my-study"
    kind = "" if isinstance(value, str) else f" (read as {type(value).__name__}, not text: quote it in YAML)"
    raise ValueError(f"{what} {value!r}{kind} cannot be a folder name: use only letters, digits, '.', '_' "
                     f"and '-' ({NAME_RULE}), not '.' or '..', e.g. {suggestion!r}")


def path_under(root: str, *parts: str) -> str:
    """``os.path.join(root, *parts)``, refused (ValueError) unless it resolves inside ``root``.

    Symbolic links are followed on both sides, so a link that points elsewhere is refused too.
    """
    path = os.path.join(root, *parts)
    real_root, real = os.path.realpath(root), os.path.realpath(path)
    if os.path.commonpath([real_root, real]) != real_root:
        raise ValueError(f"{path} resolves to {real}, outside {root}; moebench writes only inside the folder "
                         "you name: remove the link or choose another name")
    return path


def _free_bytes(folder: str) -> int | None:
    try:
        stat = os.statvfs(folder)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


def disk_full(err: BaseException, folder: str) -> bool:
    """Whether ``err`` (or an error it came from) means the device holding ``folder`` is full.

    Some writers (torch.save) report a full disk without an errno: then less than 1 MiB left
    on the device counts as full.
    """
    seen = err
    while seen is not None:
        if getattr(seen, "errno", None) == errno.ENOSPC or "No space left on device" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    free = _free_bytes(folder)
    return isinstance(err, Exception) and free is not None and free < 2**20


def disk_full_error(folder: str, what: str) -> OSError:
    """The error for a full device: which folder, what was being written, what to do."""
    return OSError(errno.ENOSPC, f"no space left on the device holding {folder} while writing {what}; "
                                 "free space there and run again")


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


class LinkRefused(ValueError):
    """A symbolic link (or a path resolving outside the folder named) where moebench would write."""


def writable_target(path: str, root: str | None = None) -> str:
    """``path`` if moebench may write it: not a symbolic link, and, with ``root`` (the folder the user named:
    a results, reports or output folder), resolving inside ``root``. Raises `LinkRefused` naming the link.

    In a folder others can write to (a shared results folder on a cluster), a planted link would make the
    next run overwrite or delete a file elsewhere; moebench refuses to write through one.
    """
    if os.path.islink(path):
        raise LinkRefused(f"{path} is a symbolic link (to {os.readlink(path)}); moebench does not write through "
                          "links in the folders it writes: remove the link and run again")
    if root is not None:
        try:
            path_under(root, os.path.relpath(path, root))
        except ValueError as err:
            raise LinkRefused(str(err)) from None
    return path


_UMASK: int | None = None


def umask() -> int:
    """This process's umask (read once)."""
    global _UMASK
    if _UMASK is None:
        try:
            with open("/proc/self/status", encoding="ascii") as f:
                _UMASK = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
        except (OSError, StopIteration, ValueError):
            _UMASK = os.umask(0o022)
            os.umask(_UMASK)
    return _UMASK


def open_nofollow(path: str, flags: int, mode: int = 0o644) -> int:
    """``os.open`` that refuses a symbolic link at ``path`` (`LinkRefused`) instead of following it."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as err:
        if err.errno == errno.ELOOP:
            writable_target(path)  # raises LinkRefused with the message
        raise


def _clear_stale_temporaries(folder: str, name: str) -> None:
    """Remove ``.<name>.<pid>.<random>.tmp`` files that `atomic_write` left for ``name`` in ``folder`` when its
    writer was killed (a process that no longer runs); those of running writers stay."""
    prefix = f".{name}."
    try:
        entries = [e for e in os.listdir(folder) if e.startswith(prefix) and e.endswith(".tmp")]
    except OSError:
        return
    for entry in entries:
        pid = entry[len(prefix):].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, entry))


def atomic_write(path: str, write: Callable[[str], None], root: str | None = None) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it to ``path``.

    Readers see the old file or the complete new one, never a partial one. ``path`` must not be a
    symbolic link and, with ``root``, must resolve inside it (`writable_target`). The file gets the
    mode any new file gets (0666 less the umask), not the temporary file's 0600. When ``write`` fails
    (a full disk, say) the temporary file is removed and the error is raised again; a full disk
    raises OSError(ENOSPC) naming the folder.
    """
    writable_target(path, root)
    folder = os.path.dirname(os.path.abspath(path))
    _clear_stale_temporaries(folder, os.path.basename(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.{os.getpid()}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException as err:
        full = disk_full(err, folder)
        _remove(tmp)
        if full:
            raise disk_full_error(folder, os.path.basename(path)) from err
        raise


PARTIAL = ".partial-"


def partial_folders(path: str) -> list[str]:
    """Temporary siblings ``.<name>.partial-<pid>`` that `atomic_folder` left for ``path``."""
    parent, name = os.path.split(os.path.abspath(path))
    prefix = f".{name}{PARTIAL}"
    try:
        return sorted(os.path.join(parent, n) for n in os.listdir(parent) if n.startswith(prefix))
    except FileNotFoundError:
        return []


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (someone else's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clear_partial_folders(path: str) -> list[str]:
    """Remove the temporary siblings of ``path`` whose writer has died; returns what was removed.

    A sibling whose writer (the pid in its name) still runs raises ValueError naming it.
    """
    removed = []
    for folder in partial_folders(path):
        pid = folder.rsplit(PARTIAL, 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and pid_alive(int(pid)):
            raise ValueError(f"process {pid} is writing {path} (into {folder}); wait for it to finish, "
                             "or stop it and run again")
        _remove(folder)
        removed.append(folder)
    return removed


def check_new_folder(path: str) -> list[str]:
    """Refuse ``path`` as a folder to write unless it is new or empty; clear dead leftovers of killed
    writes (`clear_partial_folders`) and return them. Raises ValueError naming the problem."""
    writable_target(path)  # a link at the output folder: refused before any work
    if os.path.isdir(path) and os.listdir(path):
        raise ValueError(f"{path} exists and is not empty; choose a new or empty folder")
    ancestor = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(ancestor) and os.path.dirname(ancestor) != ancestor:
        ancestor = os.path.dirname(ancestor)
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"{path}: this process cannot write into {ancestor}; choose a folder you can write to")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{path} exists and is not a folder; choose a new or empty folder")
    return clear_partial_folders(path)


def _follow_umask(folder: str) -> None:
    """Give every file and folder under ``folder`` the mode a new one gets (0666 / 0777 less the umask): some
    writers (safetensors, temporary files) create theirs 0600, unreadable to the others a checkpoint is for."""
    mask = umask()
    os.chmod(folder, 0o777 & ~mask)
    for root, dirs, names in os.walk(folder):
        for name in dirs:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in names:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), 0o666 & ~mask)


def atomic_folder(path: str, write: Callable[[str], None]) -> list[str]:
    """Call ``write(tmp)`` on an empty temporary folder beside ``path``, then rename it to ``path``.

    ``path`` either does not exist afterwards or holds everything ``write`` wrote. ``path`` may exist
    as an empty folder; a non-empty one raises ValueError before anything is written. Leftover
    temporary folders of killed runs are removed first (and returned); on failure the temporary
    folder is removed and a full disk raises OSError(ENOSPC) naming the folder. Everything written gets
    the umask's modes (`_follow_umask`).
    """
    path = os.path.abspath(path)
    removed = check_new_folder(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}{PARTIAL}{os.getpid()}")
    os.mkdir(tmp)
    try:
        write(tmp)
        _follow_umask(tmp)
        os.rename(tmp, path)  # atomic; replaces an empty folder, fails on a non-empty one
    except BaseException as err:
        full = disk_full(err, parent)
        _remove(tmp)
        if full:
            raise disk_full_error(parent, os.path.basename(path)) from err
        raise
    return removed


def atomic_write_text(path: str, text: str, root: str | None = None) -> None:
    """Write ``text`` to ``path`` atomically (see `atomic_write`)."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write, root)


def atomic_write_json(path: str, data, root: str | None = None, **dump_kwargs) -> None:
    """Write ``data`` as JSON (indent 2, sorted keys unless given) to ``path`` atomically."""
    options = {"indent": 2, "sort_keys": True, "default": str, **dump_kwargs}
    atomic_write_text(path, json.dumps(data, **options), root)


def arm_parent_death_signal() -> None:
    """Linux: this process gets SIGTERM when its parent ends (``PR_SET_PDEATHSIG``); elsewhere a no-op. Also a
    ``preexec_fn`` for a child that must not outlive the process starting it."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # 1: PR_SET_PDEATHSIG


def cache_root() -> str:
    """``$MOEBENCH_CACHE``, default ``~/.cache/moebench``: statistics, pruned checkpoints, environments."""
    return os.environ.get("MOEBENCH_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "moebench"))


def read_yaml(path: str):
    """The YAML document at ``path`` (safe loader); a file that is not YAML moebench can read (a syntax error, a
    tag such as ``!!python/object``) raises ValueError naming the file, the line and what to do."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"{path}{where}: not YAML moebench can read: {str(problem)[:200]}; plain YAML only (no "
                         "tags such as !!python/...)") from None


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


def hub_unreachable(repo_id: str, filename: str, revision: str | None = None,
                    repo_type: str | None = None) -> str | None:
    """Why the Hugging Face Hub cannot answer for ``repo_id`` now (offline mode, no connection), or None.

    One HEAD request without retries, under the Hub's own timeout (``HF_HUB_ETAG_TIMEOUT``): huggingface_hub
    otherwise retries an unreachable Hub for about half a minute. Any answer from the Hub (a missing file or a
    gated repository, say) counts as reachable, and is left to the loader to explain.
    """
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError

    if huggingface_hub.is_offline_mode():
        return "HF_HUB_OFFLINE is set"
    url = huggingface_hub.hf_hub_url(repo_id, filename, revision=revision, repo_type=repo_type)
    try:
        huggingface_hub.get_hf_file_metadata(url, timeout=huggingface_hub.constants.HF_HUB_ETAG_TIMEOUT)
    except HfHubHTTPError:
        return None
    except Exception as err:  # no connection (DNS, refused, timed out, proxy)
        return f"the Hub ({huggingface_hub.constants.ENDPOINT}) cannot be reached: {err}"
    return None
