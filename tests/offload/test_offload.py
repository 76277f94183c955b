"""Quantized offload: streamed blocks give the same logits as the in-memory model, within a budget."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import llmslim
from llmslim.memory.blocks import find_blocks
from llmslim.offload import CpuStore, DiskStore, offload_, offload_manager, split_blocks
from llmslim.offload.placement import module_nbytes
from llmslim.quant import kernels

N_LAYERS = 4


@pytest.fixture(scope="module")
def deep_llama(tmp_path_factory) -> Path:
    """A tiny Llama with 4 blocks (so some stay resident, some stream), bf16 safetensors."""
    folder = tmp_path_factory.mktemp("deep") / "llama4"
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=N_LAYERS, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=96, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


def _sizes(model) -> tuple[int, list[int]]:
    """(bytes outside the blocks, bytes of each block) of a loaded model."""
    from llmslim.stats import model_nbytes

    _, blocks = find_blocks(model)
    block_bytes = [module_nbytes(b) for b in blocks]
    return model_nbytes(model) - sum(block_bytes), block_bytes


def _budget_for(model, resident_blocks: int) -> int:
    outer, blocks = _sizes(model)
    return outer + 2 * max(blocks) + sum(blocks[:resident_blocks])


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _mapped_rss(path: Path) -> int:
    """Resident bytes of this process's mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if "-" in line.split(" ", 1)[0] and len(line.split()) >= 5:
            inside = line.split()[-1] == str(path)
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total


@pytest.fixture
def same_kernels(monkeypatch):
    """Resident NF4 layers switch to bitsandbytes' CPU kernel, streamed ones keep llmslim's (their
    tensors change every call): bit-for-bit comparisons of the offload mechanics use llmslim's everywhere."""
    monkeypatch.setattr(kernels, "cpu_packable", lambda *args: False)


@pytest.mark.parametrize("weights", ["nf4", "int8"])
@pytest.mark.parametrize("mode", ["cpu", "disk"])
def test_offloaded_logits_equal_in_memory(deep_llama, tmp_path, input_ids, weights, mode, same_kernels):
    config = llmslim.SlimConfig(weights=weights)
    in_memory = llmslim.from_pretrained(deep_llama, config, progress=False)
    budget = _budget_for(in_memory, resident_blocks=1)
    offloaded = llmslim.from_pretrained(
        deep_llama, config, progress=False, offload=mode, offload_budget=budget, offload_dir=tmp_path / "off"
    )
    manager = offload_manager(offloaded)
    assert manager.order == [1, 2, 3]
    assert isinstance(manager.store, CpuStore if mode == "cpu" else DiskStore)
    assert torch.equal(_logits(offloaded, input_ids), _logits(in_memory, input_ids))
    assert manager.loads == 3
    generated = offloaded.generate(input_ids[:1], max_new_tokens=4, do_sample=False)
    assert torch.equal(generated, in_memory.generate(input_ids[:1], max_new_tokens=4, do_sample=False))


@pytest.mark.skipif(not kernels.bnb_cpu_4bit_kernel(), reason="bitsandbytes' CPU 4-bit kernel needs AVX-512 BF16")
def test_resident_layers_use_the_cpu_kernel_and_streamed_ones_do_not(deep_llama, tmp_path, input_ids):
    config = llmslim.SlimConfig(weights="nf4")
    in_memory = llmslim.from_pretrained(deep_llama, config, progress=False)
    budget = _budget_for(in_memory, resident_blocks=1)
    offloaded = llmslim.from_pretrained(deep_llama, config, progress=False, offload="cpu", offload_budget=budget)
    torch.testing.assert_close(_logits(offloaded, input_ids), _logits(in_memory, input_ids), rtol=0.02, atol=0.02)
    mlp = [block.mlp.down_proj for block in offloaded.model.layers]  # (64, 128): a shape the CPU layout takes
    assert mlp[0].cpu_layout and not any(layer.cpu_layout for layer in mlp[1:])


def test_resident_bytes_stay_within_budget(deep_llama, tmp_path, input_ids):
    config = llmslim.SlimConfig(weights="nf4")
    model = llmslim.from_pretrained(deep_llama, config, progress=False)
    outer, blocks = _sizes(model)
    budget = _budget_for(model, resident_blocks=0)
    offloaded = llmslim.from_pretrained(deep_llama, config, progress=False, offload="disk", offload_budget=budget, offload_dir=tmp_path)
    manager = offload_manager(offloaded)
    _logits(offloaded, input_ids)
    assert manager.order == list(range(N_LAYERS))
    assert 0 < manager.peak_resident_bytes <= 2 * max(blocks)
    assert outer + manager.peak_resident_bytes <= budget
    assert _sizes(offloaded)[0] == outer  # nothing else became resident
    (offload_file,) = {loc.file for loc in manager.store.index.values()}
    assert Path(offload_file).parent == tmp_path
    assert _mapped_rss(Path(offload_file)) == 0, "used pages of the offload file must be released"


def test_disk_offload_maps_a_quantized_checkpoint_in_place(deep_llama, tmp_path, input_ids, same_kernels):
    saved = tmp_path / "nf4"
    in_memory = llmslim.from_pretrained(deep_llama, llmslim.SlimConfig(weights="nf4"), progress=False)
    llmslim.save_pretrained(in_memory, saved)
    offloaded = llmslim.from_pretrained(saved, progress=False, offload="disk", offload_budget=_budget_for(in_memory, 1))
    store = offload_manager(offloaded).store
    assert {loc.file for loc in store.index.values()} <= {str(f) for f in saved.glob("*.safetensors")}
    assert not list(tmp_path.glob("**/llmslim-offload*")), "a quantized checkpoint must not be copied"
    assert torch.equal(_logits(offloaded, input_ids), _logits(in_memory, input_ids))


def test_offload_an_already_loaded_model(deep_llama, tmp_path, input_ids):
    model = llmslim.from_pretrained(deep_llama, llmslim.SlimConfig(weights="int4"), progress=False)
    expected = _logits(model, input_ids)
    manager = offload_(model, _budget_for(model, 1), mode="disk", offload_dir=tmp_path)
    assert manager.order == [1, 2, 3]
    assert torch.equal(_logits(model, input_ids), expected)
    manager.close()
    assert torch.equal(_logits(model, input_ids), expected)  # the blocks now read the store's tensors directly


def test_everything_within_budget_offloads_nothing(deep_llama):
    model = llmslim.from_pretrained(deep_llama, llmslim.SlimConfig(weights="nf4"), progress=False, offload="cpu", offload_budget="1GiB")
    assert offload_manager(model) is None


def test_budget_below_minimum_names_it():
    with pytest.raises(ValueError, match=r"offload_budget=100 bytes .* below the minimum 1300 bytes .*raise offload_budget"):
        split_blocks(300, [500, 400], 100)


def test_split_keeps_the_first_blocks_that_fit():
    assert split_blocks(100, [50, 50, 50, 50], 100 + 100 + 60) == [1, 2, 3]
    assert split_blocks(100, [50, 50, 50, 50], 300) == []


def test_bad_offload_arguments(deep_llama):
    config = llmslim.SlimConfig(weights="nf4")
    budget = _budget_for(llmslim.from_pretrained(deep_llama, config, progress=False), 1)
    with pytest.raises(ValueError, match="offload must be one of \\['cpu', 'disk'\\].*got 'gpu'"):
        llmslim.from_pretrained(deep_llama, config, progress=False, offload="gpu")
    with pytest.raises(ValueError, match="one compute device: pass device_map='cuda:0' or 'cpu'"):
        llmslim.from_pretrained(deep_llama, config, progress=False, offload="cpu", device_map={"": "cpu", "lm_head": "cpu"})
    with pytest.raises(ValueError, match="offload='disk' from a float checkpoint .* pass offload_dir="):
        llmslim.from_pretrained(deep_llama, config, progress=False, offload="disk", offload_budget=budget)
    with pytest.raises(ValueError, match="offload_budget must be a size such as '2GiB'"):
        llmslim.from_pretrained(deep_llama, config, progress=False, offload="cpu", offload_budget="lots")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_disk_store_view_is_not_resident_until_used(tmp_path):
    from llmslim.offload import DiskWriter

    writer = DiskWriter(tmp_path)
    writer.add("a", torch.arange(2**20, dtype=torch.int32))  # 4 MiB
    store = writer.finish()
    view = store.get("a")
    assert _mapped_rss(writer.path) == 0
    assert int(view[-1]) == 2**20 - 1
    assert _mapped_rss(writer.path) > 0
    store.release("a")
    assert _mapped_rss(writer.path) == 0
    assert os.path.getsize(writer.path) == 4 * 2**20
