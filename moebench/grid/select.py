"""Cell filters for `grid run --only / --force` and `grid status --only`: cells named in spec terms.

A filter is ``key=value[,key=value...]``; a cell matches when every pair does. Keys: ``model``,
``method``, ``ratio``, ``calib``, ``skip``, ``recover`` (its kind), or any method parameter (``seed=1``). Values may use
shell wildcards (``method=hc_*``); ratios compare as numbers (``ratio=0.5`` matches 0.50). Giving
a filter several times selects the cells any of them matches.
"""

from __future__ import annotations

import fnmatch
import json

from moebench.util import did_you_mean

COLUMN_KEYS = ("model", "method", "ratio", "calib", "skip", "recover")


class FilterError(ValueError):
    """A filter that cannot be read, names no known key, or matches no cell."""


def parse_filter(text: str) -> dict[str, str]:
    """``"method=reap,ratio=0.5"`` -> ``{"method": "reap", "ratio": "0.5"}``; refuses pairs without ``=``."""
    pairs = {}
    for part in (p.strip() for p in text.split(",")):
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise FilterError(f"filter {text!r}: {part!r} is not key=value (e.g. method=reap,ratio=0.5)")
        if key.strip() in pairs:
            raise FilterError(f"filter {text!r} names {key.strip()!r} twice; give two filters to select either")
        pairs[key.strip()] = value.strip()
    return pairs


def _params(fields: dict) -> dict:
    params = fields.get("params") or {}
    return json.loads(params) if isinstance(params, str) else params


def _ratio_matches(value: str, pattern: str) -> bool:
    try:
        return abs(float(value) - float(pattern)) < 1e-9
    except ValueError:
        return fnmatch.fnmatchcase(value, pattern)


def matches(fields: dict, pairs: dict[str, str]) -> bool:
    """Whether the cell with index fields ``fields`` (`moebench.grid.index.index_row`) matches every pair."""
    for key, pattern in pairs.items():
        if key == "ratio":
            ok = _ratio_matches(f"{float(fields['ratio']):g}", pattern)
        elif key in COLUMN_KEYS:
            ok = fnmatch.fnmatchcase(str(fields.get(key) or ""), pattern)
        else:
            params = _params(fields)
            ok = key in params and fnmatch.fnmatchcase(str(params[key]), pattern)
        if not ok:
            return False
    return True


def select(cells: list, texts: list[str] | None, fields=lambda cell: cell.fields, option: str = "--only") -> list:
    """The cells of ``cells`` any filter of ``texts`` matches (all when ``texts`` is empty). Refuses unknown keys
    and filters that match nothing, naming the keys and values there are."""
    if not texts:
        return list(cells)
    rows = [fields(cell) for cell in cells]
    known = set(COLUMN_KEYS) | {key for row in rows for key in _params(row)}
    chosen: set[int] = set()
    for text in texts:
        pairs = parse_filter(text)
        for key in pairs:
            if key not in known:
                raise FilterError(f"{option} {text!r}: no cell has {key!r}{did_you_mean(key, known)}; "
                                  f"keys: {', '.join(sorted(known))}")
        hits = {i for i, row in enumerate(rows) if matches(row, pairs)}
        if not hits:
            seen = {key: sorted({str(row.get(key) or "") for row in rows}) for key in pairs if key in COLUMN_KEYS}
            shown = "; ".join(f"{key}: {', '.join(values[:12])}" for key, values in seen.items())
            raise FilterError(f"{option} {text!r} matches no cell of the study" + (f" (values there: {shown})"
                                                                                   if shown else ""))
        chosen |= hits
    return [cell for i, cell in enumerate(cells) if i in chosen]
