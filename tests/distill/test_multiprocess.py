"""Two processes on CPU (gloo) under `accelerate launch`: both ranks end with identical student weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train.tiny import write_causal, write_text

WORKER = Path(__file__).with_name("ddp_worker.py")


@pytest.mark.slow
def test_two_processes_end_with_identical_weights(tmp_path):
    teacher, text = write_causal(tmp_path / "teacher"), write_text(tmp_path)
    out = tmp_path / "student"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    args = [str(teacher), "--out", str(out), "--train", str(text), "--student-layers", "2", "--seq-len", "16"]
    args += ["--steps", "3", "--batch-size", "2", "--eval-tokens", "64", "--no-progress", "--json"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[2]), env.get("PYTHONPATH", "")])
    done = subprocess.run([*launch, str(WORKER), str(tmp_path), *args], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("eval perplexity:") == 1  # printed by the main process only
    assert '"num_processes"' not in done.stdout and '"steps": 3' in done.stdout
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]
    assert ranks[0].keys() == ranks[1].keys()
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
    teacher_embed = load_file(str(teacher / "model.safetensors"))["model.embed_tokens.weight"]
    assert not torch.equal(ranks[0]["model.embed_tokens.weight"], teacher_embed)  # it trained
    assert (out / "config.json").is_file()
    log = [json.loads(line) for line in (tmp_path / "student-run" / "log.jsonl").read_text().splitlines()]
    assert log[-2]["tokens"] == 3 * 2 * 16 * 2  # steps x batch x block x 2 processes
