"""The zoo of testbed models committed inside the package, and name -> folder resolution."""

from __future__ import annotations

from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent / "models"


def model_names() -> list[str]:
    """Names of the testbed models (committed or not yet trained), in a fixed order."""
    from moebench.testbed.recipes import RECIPES

    return list(RECIPES)


def model_dir(name: str) -> Path:
    """The package folder of testbed model `name` (it may not exist before training)."""
    if name not in model_names():
        raise ValueError(f"unknown testbed model {name!r}; known: {', '.join(model_names())}")
    return MODELS_DIR / name


def is_available(name: str) -> bool:
    """Whether the checkpoint of `name` is present (weights and config)."""
    folder = MODELS_DIR / name
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def resolve_model(name_or_path: str) -> str:
    """A testbed model name -> its absolute local folder; anything else is returned unchanged."""
    if name_or_path in model_names():
        if not is_available(name_or_path):
            raise FileNotFoundError(
                f"testbed model {name_or_path!r} has no checkpoint in {MODELS_DIR}; "
                f"train it with `moebench zoo train {name_or_path}`")
        return str(model_dir(name_or_path))
    return name_or_path


def list_models() -> list[dict]:
    """One row per testbed model: name, folder, whether present, and the recipe summary."""
    from moebench.testbed.recipes import RECIPES

    return [{"name": n, "folder": str(model_dir(n)), "available": is_available(n),
             "summary": RECIPES[n].summary} for n in model_names()]
