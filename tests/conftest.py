"""Shared fixtures: tiny models of every family, saved with a locally built tokenizer."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tiny_models import FAMILIES, VOCAB, tiny_model


def build_tokenizer():
    """A word-level tokenizer of VOCAB ids built in memory (no downloads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="session")
def saved_models(tmp_path_factory):
    """Factory: folder of a saved tiny model (with tokenizer) of a family, built once per session."""
    cache = {}

    def get(model_type: str) -> str:
        if model_type not in cache:
            folder = tmp_path_factory.mktemp(model_type)
            tiny_model(model_type).save_pretrained(folder)
            build_tokenizer().save_pretrained(folder)
            cache[model_type] = str(folder)
        return cache[model_type]

    return get


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` are skipped, with the reason, where CUDA is absent."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA: run `pytest -m gpu` on a machine with a GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_generate_tests(metafunc):
    """Tests taking a `family` argument run once per supported family."""
    already = any("family" in m.args[0] for m in metafunc.definition.iter_markers("parametrize"))
    if "family" in metafunc.fixturenames and not already:
        metafunc.parametrize("family", FAMILIES)


@pytest.fixture
def small_disk(tmp_path):
    """A folder on a 2 MiB tmpfs of its own: a disk that really fills up. Skipped where mounting is refused."""
    folder = tmp_path / "small-disk"
    folder.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a full disk is simulated by mounting a 2 MiB tmpfs, which needs root and mount(8)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mount -t tmpfs was refused here: {done.stderr.strip()}")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


def fill_disk(folder, leave: int = 16 * 1024) -> None:
    """Fill the device holding ``folder`` until about ``leave`` bytes are free (a file ``filler``)."""
    stat = os.statvfs(folder)
    with open(os.path.join(folder, "filler"), "wb") as f:
        f.write(b"\0" * max(0, stat.f_bavail * stat.f_frsize - leave))


@pytest.fixture
def corpus(tmp_path):
    """A calibration text file (``file:`` source) of the test tokenizer's words: 20 documents of 40 words."""
    import random

    rng = random.Random(0)
    docs = [" ".join(f"w{rng.randrange(VOCAB - 4)}" for _ in range(40)) for _ in range(20)]
    path = tmp_path / "calib.txt"
    path.write_text("\n\n".join(docs))
    return str(path)
