"""Calibration sources: the token windows that a statistics pass runs through a model.

A `Calibration` names a source, a number of windows, their length and a seed. `texts()` gives the
source's documents in seeded order; `tokens(tokenizer)` packs them: every document is tokenised
without special tokens, followed by the tokenizer's eos, and the stream is cut into `samples`
windows of `seq_len` tokens. No padding is ever inserted, so every position is a real token.

Hub sources go through `datasets.load_dataset`. Set `MOEBENCH_DATA_DIR` to a folder holding local
copies of hub dataset repositories under their ids (`$MOEBENCH_DATA_DIR/allenai/c4/en/...`, as
`hf download --repo-type dataset ID --local-dir $MOEBENCH_DATA_DIR/ID` writes them): a copy found
there is loaded instead of the hub, through the same code path.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import torch

from moebench.util import did_you_mean, load_plugins

DATA_DIR_ENV = "MOEBENCH_DATA_DIR"
# Calibration token totals above this are refused as a typo: 380x the papers' 128 x 2048 protocol.
MAX_CALIB_TOKENS = 100_000_000
SHUFFLE_BUFFER = 10_000  # documents held by the seeded shuffle of streamed sources
_MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra",
                  "number_theory", "prealgebra", "precalculus")


@dataclass(frozen=True)
class HubSource:
    """A dataset on the Hugging Face hub and how one of its rows becomes a document.

    `field` is a column name or a template over columns (`"Q: {question}"`). `configs` are read in
    turn and concatenated; `articles` regroups line rows into articles (WikiText); `streaming`
    reads only what is needed (not cached, so not available offline).
    """

    description: str
    dataset: str
    configs: tuple[str | None, ...] = (None,)
    split: str = "train"
    field: str = "text"
    data_files: str | None = None
    streaming: bool = False
    articles: bool = False


PRESETS: dict[str, HubSource] = {
    "c4": HubSource("C4 English, first train shard, seeded shuffle (the Wanda / Lu et al. protocol)",
                    "allenai/c4", data_files="en/c4-train.00000-of-01024.json.gz", streaming=True),
    "wikitext2": HubSource("WikiText-2 raw, train split, lines joined into articles",
                           "Salesforce/wikitext", ("wikitext-2-raw-v1",), articles=True),
    "gsm8k": HubSource("GSM8K grade-school math, train: question and worked answer",
                       "openai/gsm8k", ("main",), field="Question: {question}\nAnswer: {answer}"),
    "math": HubSource("MATH competition problems (Hendrycks et al.), train, all seven subjects",
                      "EleutherAI/hendrycks_math", _MATH_SUBJECTS,
                      field="Problem: {problem}\nSolution: {solution}"),
    "code": HubSource("evol-codealpaca-v1 (REAP's code calibration): instruction and output",
                      "theblackcat102/evol-codealpaca-v1", field="{instruction}\n\n{output}"),
}

KNOWN_SOURCES: dict[str, str] = {
    **{name: preset.description for name, preset in PRESETS.items()},
    "hf:<dataset>[:<config>]:<split>:<field or {template}>": "any hub dataset (streamed): one column, "
    "or a template over columns; colons inside a template must be followed by a space",
    "file:PATH[#field]": "local .txt (documents separated by blank lines) or .jsonl (field `text`, "
    "or the field or {template} after #)",
    "SRC+SRC+...": "several sources, one statistics set each (select methods: one pattern per task)",
}


@dataclass(frozen=True)
class RegisteredSource:
    """Calibration sources ``<prefix>:<name>`` that a plugin provides (the testbed's ``testbed:mix``).

    ``texts(name, seed)`` yields the documents of one source in seeded order; ``groups`` maps a
    group name to several of ``names`` (``testbed:domains``: one statistics set per domain);
    ``descriptions`` are shown in error messages and ``moebench calibrate --help``.
    """

    prefix: str
    names: tuple[str, ...]
    texts: Callable[[str, int], Iterable[str]]
    descriptions: dict[str, str] = field(default_factory=dict)
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)


_REGISTERED: dict[str, RegisteredSource] = {}


def register_source(source: RegisteredSource) -> None:
    """Make ``<source.prefix>:<name>`` known as a calibration source (idempotent per prefix)."""
    _REGISTERED[source.prefix.lower()] = source


def registered_sources() -> dict[str, RegisteredSource]:
    """Sources registered by plugins (`moebench.util.load_plugins` runs first), by prefix."""
    load_plugins()
    return dict(_REGISTERED)


def known_sources() -> dict[str, str]:
    """Every kind of calibration source with a description (presets, hub, files, plugins' sources)."""
    plugins = {key: text for reg in registered_sources().values() for key, text in reg.descriptions.items()}
    return {**KNOWN_SOURCES, **plugins}


@dataclass(frozen=True)
class Calibration:
    """`samples` windows of `seq_len` tokens from `source`, in the order fixed by `seed`.

    `source` is a preset name (see `KNOWN_SOURCES`), `hf:...`, `file:PATH[#field]` (made absolute
    here) or a plugin's `<prefix>:<name>` (`testbed:mix`, `testbed:<domain>`). An unknown source
    raises ValueError with suggestions.
    """

    source: str
    samples: int = 128
    seq_len: int = 2048
    seed: int = 0

    def __post_init__(self) -> None:
        problem = calibration_size_problem(self.samples, self.seq_len)
        if problem:
            raise ValueError(problem)
        object.__setattr__(self, "source", _normalise(self.source))

    @property
    def key(self) -> str:
        """Readable, filesystem-safe cache key, e.g. `c4-128x2048-s0` (files: with a content hash)."""
        return f"{_slug(self.source)}-{self.samples}x{self.seq_len}-s{self.seed}"

    def texts(self) -> Iterator[str]:
        """The source's documents in the seeded order of the protocol."""
        kind, _, rest = self.source.partition(":")
        if kind == "file":
            return _file_texts(*_split_file(rest), self.seed)
        registered = registered_sources().get(kind)
        if registered is not None:
            return iter(registered.texts(rest, self.seed))
        hub = _parse_hf(rest) if kind == "hf" else PRESETS[self.source]
        return _hub_texts(hub, self.seed, self.source)

    def tokens(self, tokenizer) -> torch.LongTensor:
        """Packed windows `[samples, seq_len]`: documents joined by eos, no padding anywhere.

        Every position is a real token. Where a tokenizer's pad token is its eos token, the
        separators carry that id too: never mask calibration tokens by the pad id.
        """
        need = self.samples * self.seq_len
        sep = _separator_id(tokenizer)
        ids: list[int] = []

        def encode(texts: list[str]) -> list[list[int]]:
            return tokenizer(texts, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]

        for batch in _batched(self.texts(), 64):
            small = [doc for doc in batch if len(doc) <= DOC_CHUNK_CHARS]
            encoded = dict(zip((i for i, d in enumerate(batch) if len(d) <= DOC_CHUNK_CHARS), encode(small),
                               strict=True)) if small else {}
            for i, doc in enumerate(batch):
                tokens = encoded[i] if i in encoded else _encode_long(doc, encode, need - len(ids))
                if tokens:
                    ids.extend(tokens)
                    ids.append(sep)
                if len(ids) >= need:
                    break
            if len(ids) >= need:
                break
        if len(ids) < need:
            raise ValueError(f"calibration source {self.source!r} holds {len(ids)} tokens; "
                             f"{self.samples} x {self.seq_len} = {need} are needed")
        return torch.tensor(ids[:need], dtype=torch.long).view(self.samples, self.seq_len)


def calibration_size_problem(samples, seq_len, names: tuple[str, str] = ("samples", "seq_len")) -> str | None:
    """Why ``samples`` windows of ``seq_len`` tokens cannot be a calibration set, or None when they can.

    Both must be whole numbers >= 1, and their product at most `MAX_CALIB_TOKENS`. ``names`` are
    what the caller calls them (``("--samples", "--seq-len")``, ``("calib_samples", "calib_seq_len")``).
    """
    for name, value in zip(names, (samples, seq_len), strict=True):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            return f"{name}={value!r} must be a whole number >= 1"
    total = samples * seq_len
    if total > MAX_CALIB_TOKENS:
        return (f"{names[0]} x {names[1]} = {samples:,} x {seq_len:,} = {total:,} calibration tokens, more than "
                f"moebench's limit of {MAX_CALIB_TOKENS:,} (the papers use 128 x 2048 = 262,144): "
                f"lower {names[0]} or {names[1]}")
    return None


def calibration_sources(spec: str) -> list[str]:
    """The single sources a (possibly multi-source) spec names, for methods with one pattern per task.

    ``testbed:domains`` expands to every testbed domain; ``a+b+c`` names several sources. A single
    source is a list of one. Each source is checked (unknown names raise with suggestions).
    """
    spec = spec.strip()
    kind, sep, rest = spec.partition(":")
    registered = registered_sources().get(kind.lower()) if sep else None
    if registered is not None and rest.lower() in registered.groups:
        return [f"{registered.prefix}:{name}" for name in registered.groups[rest.lower()]]
    try:
        return [_normalise(spec)]
    except ValueError:
        if "+" not in spec:
            raise
    return [_normalise(part) for part in spec.split("+") if part.strip()]


def parse_calibration(spec: str, samples: int = 128, seq_len: int = 2048, seed: int = 0) -> Calibration:
    """A `Calibration` from its string form (`c4`, `file:notes.txt`, `testbed:mix`, ...)."""
    return Calibration(spec, samples, seq_len, seed)


# ----- source names -------------------------------------------------------------------------------

def _normalise(source: str) -> str:
    """The canonical form of a source string; raises ValueError for unknown or malformed ones."""
    source = source.strip()
    kind, sep, rest = source.partition(":")
    if source.lower() in PRESETS:
        return source.lower()
    if sep and kind.lower() == "hf":
        _parse_hf(rest)
        return f"hf:{rest}"
    if sep and kind.lower() == "file":
        path, field = _split_file(rest)
        path = Path(path).expanduser().resolve()
        if not path.is_file() or path.suffix not in (".txt", ".jsonl"):
            raise ValueError(f"calibration file {str(path)!r} must be an existing .txt or .jsonl file")
        if field and path.suffix != ".jsonl":
            raise ValueError(f"calibration file {str(path)!r}: a #field applies to .jsonl files only")
        _read_text(str(path))  # a binary or non-UTF-8 file fails here, before any work
        return f"file:{path}" + (f"#{field}" if field else "")
    registered = registered_sources().get(kind.lower()) if sep else None
    if registered is not None and rest.lower() in registered.names:
        return f"{registered.prefix}:{rest.lower()}"
    raise ValueError(_unknown_message(source))


def _unknown_message(source: str) -> str:
    names = [*PRESETS, "hf:", "file:"]
    names += [f"{reg.prefix}:{name}" for reg in registered_sources().values() for name in (*reg.names, *reg.groups)]
    hint = did_you_mean(source.lower(), names, n=3, cutoff=0.5)
    return f"unknown calibration source {source!r}{hint}; known: {', '.join(known_sources())}"


def _slug(source: str) -> str:
    """The readable part of the cache key of a (normalised) source."""
    kind, _, rest = source.partition(":")
    if kind == "file":
        path, field = _split_file(rest)
        digest = hashlib.sha256(Path(path).read_bytes() + f"#{field}".encode()).hexdigest()[:10]
        return _safe(f"file-{Path(path).stem}" + (f"-{field}" if field else ""))[:60] + f"-{digest}"
    if kind == "hf":
        digest = hashlib.sha256(source.encode()).hexdigest()[:8]
        hub = _parse_hf(rest)
        return _safe(f"hf-{hub.dataset}-{hub.configs[0] or ''}-{hub.split}")[:60] + f"-{digest}"
    return _safe(source)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._]+", "-", text).strip("-")


def _parse_hf(rest: str) -> HubSource:
    """`<dataset>[:<config>]:<split>:<field or {template}>` -> HubSource (streamed)."""
    parts = re.split(r":(?!\s)", rest)
    if len(parts) < 3 or not all(parts[:3]) or not parts[-1]:
        raise ValueError(f"calibration source 'hf:{rest}': expected "
                         "hf:<dataset>[:<config>]:<split>:<field or {template}>")
    if len(parts) == 3:
        dataset, config, split, field = parts[0], None, parts[1], parts[2]
    else:
        dataset, config, split, field = *parts[:3], ":".join(parts[3:])
    return HubSource(f"hub dataset {dataset}", dataset, (config,), split, field.replace("\\n", "\n"),
                     streaming=True)


def _split_file(rest: str) -> tuple[str, str | None]:
    path, _, field = rest.partition("#")
    return path, field or None


# ----- readers ------------------------------------------------------------------------------------

def _render(row: dict, field: str, where: str) -> str:
    """A row as a document: one column, or a `{column}` template over columns."""
    try:
        return field.format_map(row) if "{" in field else str(row[field])
    except KeyError as err:
        raise ValueError(f"{where}: no column {err} in a row with columns {sorted(row)}") from None


def _read_text(path: str) -> str:
    """The UTF-8 text of a calibration file; a binary or otherwise undecodable file raises naming it."""
    raw = Path(path).read_bytes()
    if b"\0" in raw:
        raise ValueError(f"calibration file {path!r} is binary (it holds NUL bytes at offset {raw.index(0)}); "
                         "give a UTF-8 .txt (documents separated by blank lines) or .jsonl file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"calibration file {path!r} is not UTF-8 text (byte 0x{raw[err.start]:02x} at offset "
                         f"{err.start}); convert it, e.g. iconv -t utf-8, or give another file") from None


def _json_line(line: str, where: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where} is not JSON ({err.msg}, column {err.colno}); a .jsonl file holds one JSON "
                         "object per line") from None
    if not isinstance(row, dict):
        raise ValueError(f"{where} holds a {type(row).__name__}, not a JSON object with a text field")
    return row


def _file_texts(path: str, field: str | None, seed: int) -> Iterator[str]:
    """Documents of a .txt (blank-line separated) or .jsonl file, shuffled by `seed`."""
    raw = _read_text(path)
    if path.endswith(".txt"):
        docs = [d.strip() for d in re.split(r"\n\s*\n", raw) if d.strip()]
    else:
        docs = [_render(_json_line(line, f"file:{path} line {n}"), field or "text", f"file:{path} line {n}")
                for n, line in enumerate(raw.splitlines(), 1) if line.strip()]
    random.Random(seed).shuffle(docs)
    return iter(docs)


def _hub_texts(hub: HubSource, seed: int, source: str) -> Iterator[str]:
    """Documents of a hub source in seeded order; load failures become an OSError with fixes."""
    rows = _rows(hub, seed, source)
    if hub.articles:
        docs = _articles(row[hub.field] for row in rows)
        random.Random(seed).shuffle(docs)
        yield from docs
    else:
        yield from (_render(row, hub.field, source) for row in rows)


def _rows(hub: HubSource, seed: int, source: str) -> Iterator[dict]:
    import datasets

    path = _local_copy(hub.dataset) or hub.dataset
    try:
        parts = [datasets.load_dataset(path, config, split=hub.split, data_files=hub.data_files,
                                       streaming=hub.streaming) for config in hub.configs]
        rows = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
        if not hub.articles:  # articles are shuffled after regrouping
            rows = rows.shuffle(seed=seed, **({"buffer_size": SHUFFLE_BUFFER} if hub.streaming else {}))
        yield from rows
    except (OSError, ValueError) as err:  # ConnectionError, missing files or configs, offline mode
        raise OSError(_load_help(hub, source, err)) from err


def _local_copy(dataset: str) -> str | None:
    root = os.environ.get(DATA_DIR_ENV)
    return str(Path(root, dataset)) if root and Path(root, dataset).is_dir() else None


def _load_help(hub: HubSource, source: str, err: Exception) -> str:
    offline = any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
                  for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    cache = ("streamed sources are not cached: "
             if hub.streaming else "run once online to fill the Hugging Face cache, or ")
    mode = "; offline mode is set (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)" if offline else ""
    return (f"calibration source {source!r}: could not load dataset {hub.dataset!r} "
            f"({type(err).__name__}: {err}){mode}. To fix: go online, or {cache}download the dataset "
            f"repository into ${DATA_DIR_ENV}/{hub.dataset} (hf download --repo-type dataset "
            f"{hub.dataset} --local-dir ...), or use file:PATH with a local .txt / .jsonl")


def availability_problem(spec: str, stats_dir: str | None = None, samples: int | None = None,
                         seed: int = 0) -> str | None:
    """Why a calibration source of ``spec`` cannot be read now, found before any model is loaded; None when each
    can be tried. Files and packaged sources are read where they are named; a hub dataset passes with a local
    copy (``$MOEBENCH_DATA_DIR``), a Hub that answers, (not streamed) something of it in the datasets cache, or
    statistics of it (``samples`` windows, ``seed``) in the statistics cache ``stats_dir`` for some model: those
    may be all the run needs, which only the loaded model's fingerprint can tell."""
    from moebench.util import hub_unreachable

    for source in calibration_sources(spec):
        kind, _, rest = source.partition(":")
        if kind == "file" or kind in registered_sources():
            continue
        hub = _parse_hf(rest) if kind == "hf" else PRESETS[source]
        if _local_copy(hub.dataset) or _has_statistics(stats_dir, source, samples, seed):
            continue
        probe = hub.data_files if hub.data_files and not any(c in hub.data_files for c in "*?[") else "README.md"
        why = hub_unreachable(hub.dataset, probe, repo_type="dataset")
        if why is None or (not hub.streaming and _in_datasets_cache(hub.dataset)):
            continue
        return _load_help(hub, source, ConnectionError(why))
    return None


def _has_statistics(stats_dir: str | None, source: str, samples: int | None, seed: int) -> bool:
    """Whether the statistics cache holds a folder for ``source`` with ``samples`` windows and ``seed`` (any model,
    any window length)."""
    if stats_dir is None:
        return False
    pattern = f"{glob.escape(_slug(source))}-{samples if samples is not None else '*'}x*-s{seed}"
    return any(Path(path).is_dir() for path in glob.glob(os.path.join(glob.escape(stats_dir), "*", pattern)))


def _in_datasets_cache(dataset: str) -> bool:
    """Whether the datasets or hub cache holds anything of ``dataset`` (it may then load offline)."""
    import datasets.config
    from huggingface_hub.constants import HF_HUB_CACHE

    names = [Path(datasets.config.HF_DATASETS_CACHE, dataset.replace("/", "___")),
             Path(HF_HUB_CACHE, "datasets--" + dataset.replace("/", "--"))]
    return any(path.is_dir() and any(path.iterdir()) for path in names)


def _articles(lines: Iterable[str]) -> list[str]:
    """Regroup WikiText line rows into articles, which start at ` = Title = ` heading lines."""
    articles: list[list[str]] = []
    for line in lines:
        if re.fullmatch(r" = [^=].* = \n?", line) or not articles:
            articles.append([])
        articles[-1].append(line)
    return [text for text in ("".join(a).strip() for a in articles) if text]


DOC_CHUNK_CHARS = 1 << 20  # a longer document is tokenised a piece at a time, only as far as tokens are needed


def _encode_long(doc: str, encode, wanted: int) -> list[int]:
    """The tokens of a document longer than `DOC_CHUNK_CHARS`, read a piece at a time (cut at whitespace) until
    ``wanted`` tokens are there: a 30 MB document costs what its first tokens cost, not its whole tokenisation
    (ours; tokens at a cut may differ from tokenising the whole document)."""
    tokens: list[int] = []
    start = 0
    while start < len(doc) and len(tokens) < wanted:
        end = min(len(doc), start + DOC_CHUNK_CHARS)
        if end < len(doc):
            space = doc.rfind(" ", start + DOC_CHUNK_CHARS // 2, end)
            end = space if space > start else end
        tokens.extend(encode([doc[start:end]])[0])
        start = end
    return tokens


def _separator_id(tokenizer) -> int:
    """The eos id (sep as a fallback) that joins documents in the packed stream."""
    for name in ("eos_token_id", "sep_token_id"):
        if getattr(tokenizer, name, None) is not None:
            return int(getattr(tokenizer, name))
    raise ValueError(f"{type(tokenizer).__name__} has no eos or sep token to separate documents")


def _batched(items: Iterator[str], size: int) -> Iterator[list[str]]:
    while batch := list(islice(items, size)):
        yield batch
