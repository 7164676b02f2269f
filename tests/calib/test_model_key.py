"""One statistics key per model, whichever way a front end names it."""

from __future__ import annotations

import os

from tiny_models import tiny_model

from moebench.calib.cache import model_identity, model_key
from moebench.testbed.zoo import model_dir


def test_a_registered_name_and_its_folder_have_one_identity(tmp_path, monkeypatch):
    folder = str(model_dir("testbed-8e"))
    link = tmp_path / "linked"
    link.symlink_to(folder)
    monkeypatch.chdir(os.path.dirname(folder))
    names = ["testbed-8e", folder, folder + "/", "./testbed-8e", "../models/testbed-8e", str(link)]
    assert {model_identity(n) for n in names} == {os.path.realpath(folder)}
    model = tiny_model("mixtral")
    keys = {model_key(model, n) for n in names}
    assert len(keys) == 1 and next(iter(keys)).startswith("testbed-8e-")


def test_a_hub_id_stays_itself_with_its_revision():
    assert model_identity("mistralai/Mixtral-8x7B-v0.1") == "mistralai/Mixtral-8x7B-v0.1"
    assert model_identity("mistralai/Mixtral-8x7B-v0.1", "refs/pr/1") == "mistralai/Mixtral-8x7B-v0.1@refs/pr/1"
    model = tiny_model("mixtral")
    assert model_key(model, "mistralai/Mixtral-8x7B-v0.1").startswith("mistralai--Mixtral-8x7B-v0.1-")
    pr = model_key(model, "mistralai/Mixtral-8x7B-v0.1", "refs/pr/1")
    assert pr.startswith("mistralai--Mixtral-8x7B-v0.1@refs-pr-1-") and "/" not in pr


def test_different_weights_under_one_name_get_different_keys():
    assert model_key(tiny_model("mixtral", seed=0), "testbed-8e") != model_key(tiny_model("mixtral", seed=1),
                                                                              "testbed-8e")
