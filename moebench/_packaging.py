"""Build steps (setuptools commands) that install moebench's lm-eval registration file.

The file ``moebench_lm_eval.pth`` must sit at the root of site-packages, where Python reads
``.pth`` files at start-up; its one line imports the top-level module ``moebench_lm_eval_hook``
(a ``py-modules`` entry of pyproject.toml) and installs its import hook.
Files at the root of a wheel land there, so:

- `BuildPy` writes the file at the root of the build folder, which becomes the wheel
  (``pip install .``);
- `EditableWheel` adds it to the editable wheel (``pip install -e .``), whose build folder is not
  shipped, and records it in the wheel's RECORD so that ``pip uninstall`` removes it.

The name starts with a lowercase letter so that it sorts (and runs) after the
``__editable__.*.pth`` file that makes an editable moebench importable.

Used only while building (pyproject.toml ``[tool.setuptools.cmdclass]``); never imported at run time.
"""

from __future__ import annotations

import base64
import hashlib
import os
import zipfile
from pathlib import Path

from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH_NAME = "moebench_lm_eval.pth"
HOOK_MODULE = "moebench_lm_eval_hook"
# One line: Python runs .pth lines that start with "import". It stays silent where the hook
# module cannot be found (e.g. an editable checkout that was moved away).
PTH_TEXT = f"import importlib.util as _u; _u.find_spec('{HOOK_MODULE}') and __import__('{HOOK_MODULE}').install()\n"


class BuildPy(build_py):
    """``build_py`` that also writes the registration ``.pth`` at the root of the wheel."""

    def run(self):
        super().run()
        if not self.editable_mode:
            Path(self.build_lib).mkdir(parents=True, exist_ok=True)
            Path(self.build_lib, PTH_NAME).write_text(PTH_TEXT)

    def get_outputs(self, include_bytecode=True):
        outputs = super().get_outputs(include_bytecode)
        return outputs if self.editable_mode else [*outputs, os.path.join(self.build_lib, PTH_NAME)]


class EditableWheel(editable_wheel):
    """``editable_wheel`` that adds the registration ``.pth`` to the editable wheel it builds."""

    def run(self):
        super().run()
        wheels = sorted(Path(self.dist_dir).glob("*-0.editable-*.whl"), key=lambda p: p.stat().st_mtime)
        if not wheels:
            raise RuntimeError(f"moebench: no editable wheel found in {self.dist_dir} to add {PTH_NAME} to")
        add_to_wheel(wheels[-1], PTH_NAME, PTH_TEXT.encode())


def add_to_wheel(wheel: Path, name: str, data: bytes) -> None:
    """Add a file at the root of a wheel and list it, with its hash, in the wheel's RECORD."""
    with zipfile.ZipFile(wheel) as src:
        entries = [(info, src.read(info)) for info in src.infolist() if info.filename != name]
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    line = f"{name},sha256={digest},{len(data)}\n".encode()
    tmp = wheel.with_name(wheel.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        dst.writestr(name, data)
        for info, content in entries:
            if info.filename.endswith(".dist-info/RECORD"):
                content = content.rstrip(b"\n") + b"\n" + line
            dst.writestr(info, content)
    os.replace(tmp, wheel)
