"""A shared `offload_dir`: each load keeps files of its own, removed with its model; a killed load's leftovers do not matter."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import write_tiny_model
from transformers import AutoModelForCausalLM, LlamaConfig

import llmslim
from llmslim.offload import offload_manager
from llmslim.offload.placement import module_nbytes
from llmslim.quant import kernels

CONFIG = llmslim.SlimConfig(weights="nf4")


def _write_llama(folder: Path, seed: int) -> Path:
    """A tiny Llama with 4 blocks, so that some blocks stream."""
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=96, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llamas(tmp_path_factory) -> list[Path]:
    """Two 4-block llamas of the same shapes, different weights."""
    root = tmp_path_factory.mktemp("llamas")
    return [_write_llama(root / f"seed{seed}", seed) for seed in (0, 1)]


@pytest.fixture(autouse=True)
def same_kernels(monkeypatch):
    """llmslim's NF4 kernel for resident and streamed layers alike (see test_offload.same_kernels)."""
    monkeypatch.setattr(kernels, "cpu_packable", lambda *args: False)


def _budget(path: Path) -> int:
    """Room for the outer tensors, two streamed blocks and one resident block: blocks 1-3 are offloaded."""
    model = llmslim.from_pretrained(path, CONFIG, progress=False)
    blocks = [module_nbytes(b) for b in model.model.layers]
    return module_nbytes(model) - sum(blocks) + 3 * max(blocks)


def _load(path: Path, folder: Path, budget: int | str):
    return llmslim.from_pretrained(path, CONFIG, progress=False, offload="disk", offload_budget=budget, offload_dir=folder)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _sizes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in folder.iterdir()}


def test_second_load_into_the_same_offload_dir_leaves_the_first_model_intact(llamas, tmp_path, input_ids):
    budget = _budget(llamas[0])
    first = _load(llamas[0], tmp_path, budget)
    assert offload_manager(first).order == [1, 2, 3]
    expected = _logits(first, input_ids)
    second = _load(llamas[1], tmp_path, budget)
    assert not torch.equal(_logits(second, input_ids), expected)  # other weights, same file sizes
    assert torch.equal(_logits(first, input_ids), expected)
    assert len([n for n in _files(tmp_path) if n.endswith(".bin")]) == 2, _files(tmp_path)


def test_a_load_that_offloads_nothing_writes_nothing(llamas, tmp_path, input_ids):
    first = _load(llamas[0], tmp_path, _budget(llamas[0]))
    before = _sizes(tmp_path)
    assert before
    unbounded = _load(llamas[1], tmp_path, "1GiB")
    assert offload_manager(unbounded) is None
    assert _sizes(tmp_path) == before, "a load that offloads nothing must not create (or truncate) a file"
    _logits(first, input_ids)  # the first model's file is intact (a truncated mapping would raise SIGBUS here)


def test_disk_offload_that_offloads_nothing_needs_no_offload_dir(llamas):
    model = llmslim.from_pretrained(llamas[0], CONFIG, progress=False, offload="disk", offload_budget="1GiB")
    assert offload_manager(model) is None


def test_offload_files_are_removed_with_their_model(llamas, tmp_path):
    model = _load(llamas[0], tmp_path, _budget(llamas[0]))
    assert _files(tmp_path)
    del model
    gc.collect()
    assert _files(tmp_path) == []


def test_device_map_offload_into_a_shared_dir_keeps_each_models_weights(tmp_path, input_ids):
    paths = [write_tiny_model(tmp_path / f"seed{seed}", "llama", seed=seed) for seed in (0, 1)]
    kwargs = dict(device_map="auto", max_memory={"cpu": 12_000}, offload_dir=tmp_path / "offload", progress=False)
    first = llmslim.from_pretrained(paths[0], CONFIG, **kwargs)
    expected = _logits(first, input_ids)
    second = llmslim.from_pretrained(paths[1], CONFIG, **kwargs)
    assert not torch.equal(_logits(second, input_ids), expected)
    assert torch.equal(_logits(first, input_ids), expected)
    del first, second
    gc.collect()
    assert _files(tmp_path / "offload") == []


_KILLED_LOAD = """
import os, signal
import llmslim
from llmslim.offload import store

add, written = store.DiskWriter.add, []

def add_then_die(self, name, tensor):
    add(self, name, tensor)
    written.append(name)
    if len(written) == 5:  # part of the file is written
        self.handle.flush()
        os.kill(os.getpid(), signal.SIGKILL)

store.DiskWriter.add = add_then_die
config = llmslim.SlimConfig(weights="nf4")
llmslim.from_pretrained({path!r}, config, progress=False, offload="disk", offload_budget={budget}, offload_dir={folder!r})
"""


def test_load_killed_while_writing_its_offload_file(llamas, tmp_path, input_ids):
    budget, folder = _budget(llamas[0]), tmp_path / "offload"
    script = textwrap.dedent(_KILLED_LOAD.format(path=str(llamas[0]), budget=budget, folder=str(folder)))
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    leftovers = _files(folder)
    assert leftovers and all(Path(folder, n).stat().st_size > 0 for n in leftovers), leftovers

    model = _load(llamas[0], folder, budget)
    expected = _logits(llmslim.from_pretrained(llamas[0], CONFIG, progress=False), input_ids)
    assert torch.equal(_logits(model, input_ids), expected)
    assert not set(leftovers) & set(_files(folder)), "a dead load's files are removed by the next load"


_FORKED_CHILD_EXITS = """
import os, sys
from pathlib import Path
from llmslim.offload.folder import OffloadFiles

files = OffloadFiles({folder!r})
files.path(".bin").write_bytes(b"weights")
pid = os.fork()
if pid == 0:
    sys.exit(0)  # a normal exit runs the finalizers the child inherited
os.waitpid(pid, 0)
assert files.path(".bin").exists(), "a forked child removed its parent's offload file"
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_leaves_its_parents_offload_files(tmp_path):
    script = textwrap.dedent(_FORKED_CHILD_EXITS.format(folder=str(tmp_path)))
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr[-2000:]
    assert _files(tmp_path) == [], "the parent removes its own files at exit"
