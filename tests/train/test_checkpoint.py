"""Checkpoint files: pruning deletes only llmslim's own checkpoints; interrupted saves are cleaned up; steps sort as numbers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from llmslim.train.checkpoint import check_run_dir, checkpoint_dir, find_checkpoint, load_checkpoint, save_checkpoint


@pytest.fixture
def model_and_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def save(run, step, model_and_optimizer, keep=2):
    model, optimizer = model_and_optimizer
    return save_checkpoint(run, step, model, optimizer, {"seed": 0}, keep=keep)


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_pruning_deletes_only_checkpoints_it_wrote(tmp_path, model_and_optimizer):
    folder = tmp_path / "checkpoints"
    foreign = {
        "step-0000000": {"trainer_state.json": "{}", "notes.txt": "mine"},  # a checkpoint folder someone added to
        "step-0000001-backup": {"trainer_state.json": "{}"},  # not a name save_checkpoint gives
        "step-0000002": {"model.safetensors": "mine"},  # no trainer_state.json: not a checkpoint
        "best": {"trainer_state.json": "{}"},
    }
    for name, files in foreign.items():
        (folder / name).mkdir(parents=True)
        for file, text in files.items():
            (folder / name / file).write_text(text)
    (tmp_path / "elsewhere").mkdir()
    (folder / "step-0000003").symlink_to(tmp_path / "elsewhere")
    for step in (4, 5, 6):
        save(tmp_path, step, model_and_optimizer)
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted([*foreign, "step-0000003", "step-0000005", "step-0000006"])
    assert (folder / "step-0000000" / "notes.txt").read_text() == "mine" and (tmp_path / "elsewhere").is_dir()


def test_steps_sort_as_numbers(tmp_path, model_and_optimizer):
    save(tmp_path, 9_999_999, model_and_optimizer)
    save(tmp_path, 10_000_000, model_and_optimizer)  # 8 digits: sorts before step-9999999 as a string
    save(tmp_path, 10_000_001, model_and_optimizer)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-10000000", "step-10000001"]
    assert find_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 10_000_001)


def test_interrupted_saves_are_cleaned_up_by_the_next_save(tmp_path, model_and_optimizer):
    folder = tmp_path / "checkpoints"
    save(tmp_path, 1, model_and_optimizer)
    host, dead = socket.gethostname(), dead_pid()
    leftovers = [f".step-0000002.tmp-{host}-{dead}-abcd1234", f".step-0000001.old-{host}-{dead}-abcd1234"]
    alive = f".step-0000003.tmp-{host}-{os.getpid()}-abcd1234"  # a save still running: not touched
    for name in [*leftovers, alive]:
        (folder / name).mkdir()
        (folder / name / "model.safetensors").write_text("partial")
    save(tmp_path, 4, model_and_optimizer, keep=3)
    assert sorted(p.name for p in folder.iterdir()) == sorted([alive, "step-0000001", "step-0000004"])
    assert load_checkpoint(folder / "step-0000004").step == 4


def test_saving_a_step_again_replaces_it(tmp_path, model_and_optimizer):
    first = save(tmp_path, 1, model_and_optimizer)
    (first / "model.safetensors").write_bytes(b"stale")
    save(tmp_path, 1, model_and_optimizer)
    assert load_checkpoint(first).weights.keys() == {"weight", "bias"}
    assert sorted(p.name for p in first.parent.iterdir()) == ["step-0000001"]


@pytest.mark.parametrize(("run", "refused"), [("out", True), ("out/run", True), ("out-run", False), (".", False)])
def test_run_folder_inside_the_output_is_refused(tmp_path, run, refused):
    if not refused:
        check_run_dir(tmp_path / run, tmp_path / "out")
        return
    message = (
        r"the run folder \S+ \(checkpoints, log\) is inside the output folder \S+/out, which saving replaces: use a --run-dir outside it"
    )
    with pytest.raises(ValueError, match=message + r", such as \S+/out-run"):
        check_run_dir(tmp_path / run, tmp_path / "out")
