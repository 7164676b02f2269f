"""Splits, training streams and calibration texts of the synthetic testbed.

An instance belongs to exactly one split, decided by a stable hash of its domain and prompt:
`eval` (8%), `calib` (6%) or `train` (the rest). Sampling a split draws instances and keeps
those that hash into it, so the train, calibration and evaluation splits are disjoint at the
instance level whatever the seeds. (The facts domain shares its world across splits by design:
recall needs the fact in training; the prompts that ask for it differ.)
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator

from moebench.testbed.domains import DOMAINS, GENERATORS, Item

SPLITS: tuple[str, ...] = ("train", "calib", "eval")
_BOUNDS = {"eval": (0, 8), "calib": (8, 14), "train": (14, 100)}
# Share of each domain in the training stream and in `mix` calibration (the harder skills get more).
TRAIN_WEIGHTS: dict[str, float] = {"arithmetic": 0.22, "facts": 0.12, "grammar": 0.12,
                                   "code": 0.18, "logic": 0.14, "sequences": 0.22}
SEPARATOR = "\n"


def split_of(item: Item) -> str:
    """The split an instance belongs to (stable across runs, platforms and Python versions)."""
    digest = hashlib.blake2b(f"{item.domain}|{item.prompt}".encode(), digest_size=8).digest()
    bucket = int.from_bytes(digest, "big") % 100
    return next(name for name, (lo, hi) in _BOUNDS.items() if lo <= bucket < hi)


def _check(domain: str, split: str) -> None:
    if domain not in GENERATORS:
        raise ValueError(f"unknown testbed domain {domain!r}; known: {', '.join(DOMAINS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")


def stream(domain: str, split: str, seed: int) -> Iterator[Item]:
    """An endless, deterministic stream of instances of `domain` in `split` (repeats possible)."""
    _check(domain, split)
    rng = random.Random(f"{domain}/{split}/{seed}")
    generate = GENERATORS[domain]
    while True:
        item = generate(rng)
        if split_of(item) == split:
            yield item


def items(domain: str, split: str, n: int, seed: int = 0) -> list[Item]:
    """`n` distinct instances (by prompt) of `domain` in `split`, always the same for a seed."""
    seen: set[str] = set()
    out: list[Item] = []
    for tries, item in enumerate(stream(domain, split, seed)):
        if tries > 200 * n + 10_000:
            raise ValueError(f"{domain}/{split}: only {len(out)} distinct instances, {n} asked")
        if item.prompt not in seen:
            seen.add(item.prompt)
            out.append(item)
            if len(out) == n:
                return out
    return out


def mixed_stream(split: str, seed: int, weights: dict[str, float] | None = None) -> Iterator[Item]:
    """Instances of all domains interleaved at random with the given weights (default: training mix)."""
    weights = weights or TRAIN_WEIGHTS
    names = list(weights)
    streams = {d: stream(d, split, seed) for d in names}
    rng = random.Random(f"mix/{split}/{seed}")
    while True:
        yield next(streams[rng.choices(names, weights=[weights[d] for d in names])[0]])


def documents(split: str, n: int, items_per_doc: int, seed: int = 0, domain: str = "mix") -> list[str]:
    """`n` documents, each `items_per_doc` instances joined by newlines."""
    source = mixed_stream(split, seed) if domain == "mix" else stream(domain, split, seed)
    return [SEPARATOR.join(next(source).text for _ in range(items_per_doc)) for _ in range(n)]


def calibration_texts(domain: str = "mix", n: int = 128, seed: int = 0, items_per_text: int = 8) -> list[str]:
    """`n` calibration texts from the calibration split.

    `domain` is "mix" (all domains, the generic C4 analogue) or one domain name (the MATH / code
    analogue). Each text joins `items_per_text` instances with newlines.
    """
    if domain != "mix":
        _check(domain, "calib")
    return documents("calib", n, items_per_text, seed=seed, domain=domain)
