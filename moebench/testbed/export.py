"""Write the lm-eval task data of the testbed (JSON lines shipped in `moebench.tasks`).

All rows come from the evaluation split, with fixed seeds, so rebuilding gives identical files.
"""

from __future__ import annotations

import json
from pathlib import Path

from moebench.testbed.data import documents, items
from moebench.testbed.domains import DOMAINS

MC_ITEMS = 400
GEN_ITEMS = 200
GEN_DOMAINS: tuple[str, ...] = ("arithmetic", "code", "sequences")
PPL_DOCS = 100
PPL_ITEMS_PER_DOC = 8


def data_dir() -> Path:
    """The folder holding the task data (inside the installed `moebench.tasks` package)."""
    from moebench.tasks import task_dir

    return Path(task_dir()) / "testbed" / "data"


def mc_rows(domain: str, n: int = MC_ITEMS) -> list[dict]:
    """Multiple-choice rows: prompt, four choices, index of the answer."""
    return [{"prompt": it.prompt, "choices": list(it.choices), "gold": it.gold}
            for it in items(domain, "eval", n, seed=0)]


def gen_rows(domain: str, n: int = GEN_ITEMS) -> list[dict]:
    """Generation rows: prompt and the exact expected answer."""
    return [{"prompt": it.prompt, "answer": it.answer} for it in items(domain, "eval", n, seed=1)]


def ppl_rows(n: int = PPL_DOCS) -> list[dict]:
    """Held-out mixed documents for the perplexity task."""
    return [{"text": t} for t in documents("eval", n, PPL_ITEMS_PER_DOC, seed=2)]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows), encoding="utf-8")
    return path


def build_tasks(out: str | Path | None = None) -> list[Path]:
    """Write every task's data file to `out` (default: the package's data folder)."""
    out = Path(out) if out else data_dir()
    out.mkdir(parents=True, exist_ok=True)
    written = [_write(out / f"{d}_mc.jsonl", mc_rows(d)) for d in DOMAINS]
    written += [_write(out / f"{d}_gen.jsonl", gen_rows(d)) for d in GEN_DOMAINS]
    written.append(_write(out / "mixed_ppl.jsonl", ppl_rows()))
    return written
