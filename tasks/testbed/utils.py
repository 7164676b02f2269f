"""Loader of the testbed task data, resolved next to this file (never against the working directory)."""

from __future__ import annotations

import json
from pathlib import Path

import datasets

DATA = Path(__file__).resolve().parent / "data"


def load(name: str, first: int | None = None, **_metadata) -> datasets.DatasetDict:
    """The task data `data/<name>.jsonl` as a DatasetDict with one `test` split (its `first` items if given)."""
    with open(DATA / f"{name}.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = rows[:first] if first else rows
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
