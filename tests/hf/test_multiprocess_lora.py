"""QLoRA on two CPU processes (gloo) with examples/qlora_accelerate.py: DDP through `accelerate launch`, and
torch's FSDP2, which shards llmslim's quantized codes; both save the adapter a one-process run saves."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmslim.plan import Hardware, Workload, plan_model
from llmslim.plan.hardware import GiB

ROOT = Path(__file__).parents[2]
SCRIPT = ROOT / "examples" / "qlora_accelerate.py"
PRESET = ROOT / "examples" / "accelerate" / "ddp_cpu.yaml"


def _run(base: Path, out: Path, weights: str, processes: int, *extra: str) -> str:
    args = [str(SCRIPT), str(base), "--out", str(out), "--weights", weights, "--steps", "3", "--seq-len", "32", *extra]
    if processes > 1:
        args = ["-m", "accelerate.commands.launch", "--config_file", str(PRESET), "--num_processes", str(processes), *args]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["nf4", "int8"])
def test_ddp_and_fsdp2_on_two_processes_save_the_one_process_adapter(base, tmp_path, weights):
    single = _run(base, tmp_path / "one", weights, 1)
    ddp = _run(base, tmp_path / "ddp", weights, 2)
    fsdp = _run(base, tmp_path / "fsdp", weights, 2, "--fsdp")
    losses = [re.findall(r"loss (\S+)", out) for out in (single, ddp, fsdp)]
    assert len(losses[0]) == 3 and losses[0] == losses[1] == losses[2]  # printed to 4 decimals, by the main process only

    held = [tuple(map(int, m)) for m in re.findall(r"FSDP2 holds (\d+) of the (\d+) bytes", fsdp)]
    assert len(held) == 2 and all(0 < part <= whole // 2 + 64 for part, whole in held)  # each process: about half
    # the planner counts the same codes, and gives each process its half
    workload = Workload(train=True, context=32, parallel="fsdp", processes=2)
    planned = plan_model(base, Hardware([], 24 * GiB, 10**12), workload).formats[weights]
    assert planned.weights.codes == held[0][1]
    assert planned.process.weights - planned.weights.scales - planned.weights.buffers == pytest.approx(
        (planned.weights.codes + planned.weights.kept) / 2, abs=1
    )

    reference = _adapter(tmp_path / "one")
    for run in ("ddp", "fsdp"):
        adapter = _adapter(tmp_path / run)
        assert adapter.keys() == reference.keys()
        for name, tensor in reference.items():
            torch.testing.assert_close(adapter[name], tensor, rtol=1e-5, atol=1e-6, msg=f"{run}: {name}")
    assert any(not torch.equal(t, torch.zeros_like(t)) for name, t in reference.items() if "lora_B" in name)  # it trained
