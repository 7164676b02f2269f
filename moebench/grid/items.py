"""Per-item results of a cell: ``cells/<id>/items.csv.gz``, a few KB, for paired comparisons.

lm-eval's logged samples hold every document, prompt and response (megabytes per cell); a report
needs only each item's metric values. One row per task x item x filter x metric:
``task``, ``doc_id``, ``doc_hash`` (the first 12 hex digits of lm-eval's hash of the document, so two
cells can be checked to have scored the same items), ``filter``, ``metric``, ``value``. Only scalar
per-item values are kept (corpus-level metrics such as BLEU log tuples per item and are left out).
The file is gzip-compressed CSV with a zero timestamp: the same items give the same bytes.
"""

from __future__ import annotations

import gzip
import io
import os

import pandas as pd

from moebench.util import atomic_write

FILE = "items.csv.gz"
COLUMNS = ["task", "doc_id", "doc_hash", "filter", "metric", "value"]


def item_rows(samples: dict | None) -> list[dict]:
    """Rows (see module docstring) from lm-eval's ``results["samples"]`` (task -> logged samples)."""
    rows = []
    for task, logged in sorted((samples or {}).items()):
        for sample in logged:
            for metric in sample.get("metrics", []):
                value = sample.get(metric)
                if isinstance(value, (bool, int, float)):
                    rows.append({"task": task, "doc_id": int(sample["doc_id"]),
                                 "doc_hash": str(sample.get("doc_hash") or "")[:12],
                                 "filter": sample.get("filter", "none"), "metric": metric, "value": float(value)})
    return rows


def count_requests(samples: dict | None) -> int:
    """Requests the evaluation loop sent to the model: one per choice of a multiple-choice item, one per
    generation (lm-eval's logged ``arguments`` of each sample)."""
    return sum(len(sample.get("arguments") or ()) for logged in (samples or {}).values() for sample in logged)


def items_frame(samples: dict | None) -> pd.DataFrame:
    """The per-item table of ``samples``, sorted."""
    frame = pd.DataFrame(item_rows(samples), columns=COLUMNS)
    return frame.sort_values(["task", "filter", "metric", "doc_id"]).reset_index(drop=True)


def write_items(folder: str, samples: dict | None) -> str | None:
    """Write ``folder/items.csv.gz`` atomically; returns its path, or None when there are no items."""
    frame = items_frame(samples)
    if frame.empty:
        return None
    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
        f.write(frame.to_csv(index=False).encode())
    path = os.path.join(folder, FILE)
    data = raw.getvalue()

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)
    return path


def read_items(folder: str) -> pd.DataFrame | None:
    """A cell's per-item table, or None when the cell has none (cells from before it was recorded)."""
    path = os.path.join(folder, FILE)
    if not os.path.exists(path):
        return None
    frame = pd.read_csv(path, keep_default_na=False, na_values=[""], dtype={"doc_hash": str})
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: per-item file lacks columns {missing}; expected {COLUMNS}")
    return frame
