"""Expert offload: a mixture-of-experts model keeps its quantized experts in CPU RAM or memory-mapped from disk
while everything else is resident; logits equal the in-memory model's."""

from __future__ import annotations

import pytest
import torch
from quant.tiny_moe import float_moe as _float_model

import llmslim
from llmslim import SlimConfig
from llmslim.offload.store import CpuStore, DiskStore
from llmslim.quant.experts import quantized_experts


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    folder = tmp_path_factory.mktemp("moe") / "qwen3_moe"
    _float_model("qwen3_moe").save_pretrained(folder)
    return folder


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("weights", ["nf4", "int4", "int8"])
def test_every_offload_path_gives_the_in_memory_logits(hub, tmp_path, weights):
    ids = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(4))
    resident = llmslim.from_pretrained(hub, SlimConfig(weights=weights), progress=False)
    expected = _logits(resident, ids)
    llmslim.save_pretrained(resident, tmp_path / "saved")
    models = {
        "disk, mapped in place": llmslim.from_pretrained(tmp_path / "saved", offload="disk", progress=False),
        "disk, written once": llmslim.from_pretrained(
            hub, SlimConfig(weights=weights), offload="disk", offload_dir=tmp_path / "off", progress=False
        ),
        "cpu": llmslim.from_pretrained(hub, SlimConfig(weights=weights), offload="cpu", progress=False),
    }
    for how, model in models.items():
        store = model.__dict__["_llmslim_offload_experts"]
        assert isinstance(store, CpuStore if how == "cpu" else DiskStore), how
        offloaded = sum(len(s.names) for _, s in quantized_experts(model))
        assert len(store.index if isinstance(store, DiskStore) else store.tensors) == offloaded, how
        got = _logits(model, ids)
        if weights == "int8" and how == "disk, mapped in place":
            # safetensors offsets are not 64-byte aligned, so int8 experts mapped in place take torch's other int8 kernel
            torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4)
        else:
            assert torch.equal(got, expected), how


def test_an_offload_dir_that_cannot_take_files_is_refused_before_loading(hub, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match=r"offload_dir '.*a-file/off' cannot take the offloaded weights"):
        llmslim.from_pretrained(hub, SlimConfig(weights="nf4"), offload="disk", offload_dir=blocker / "off", progress=False)
    assert blocker.read_text() == "not a folder"


def test_disk_offload_from_a_float_checkpoint_needs_a_folder(hub):
    with pytest.raises(ValueError, match=r"offload='disk' from a float checkpoint writes the quantized experts once: pass offload_dir="):
        llmslim.from_pretrained(hub, SlimConfig(weights="nf4"), offload="disk", progress=False)
