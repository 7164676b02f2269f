"""lm-eval task configurations and their local data, shipped inside the package."""

from __future__ import annotations

from pathlib import Path


def task_dir() -> str:
    """Absolute folder of moebench's task YAMLs: pass it to lm-eval as `include_path`."""
    return str(Path(__file__).resolve().parent)
