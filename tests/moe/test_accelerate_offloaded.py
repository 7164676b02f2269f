"""Models whose weights accelerate offloads (device_map with cpu / disk): fingerprinted from the real weights,
and never pruned through their meta placeholders."""

from __future__ import annotations

import pytest
import torch
from tiny_models import sample_ids, tiny_model

from moebench.calib.cache import model_fingerprint
from moebench.moe.ops import prune
from moebench.moe.view import MoEError, MoEView


def test_offloaded_weights_are_fingerprinted_like_the_loaded_model_and_pruning_them_is_refused(tmp_path):
    from accelerate import disk_offload

    model = tiny_model("mixtral")
    expected = model_fingerprint(model)
    with torch.no_grad():
        reference = model(sample_ids()).logits
    disk_offload(model, str(tmp_path / "offload"), execution_device=torch.device("cpu"))
    assert any(p.is_meta for p in model.parameters())  # the real tensors are behind accelerate's hooks
    assert model_fingerprint(model) == expected  # it used to fail: "Cannot copy out of meta tensor"
    with pytest.raises(MoEError, match=r"offloaded by accelerate .* --sequential"):
        prune(model, {i: [0, 1, 2, 3] for i in MoEView(model).indices})
    with torch.no_grad():
        torch.testing.assert_close(model(sample_ids()).logits, reference)  # untouched by the refusal
