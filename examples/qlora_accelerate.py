"""QLoRA written the usual way (transformers + peft + accelerate) on a base quantized by llmslim.

The only llmslim line is `quantization_config=SlimConfig(...)`. Runs as one process, or under
`accelerate launch` with one of the presets in examples/accelerate/ (DDP on CPU or GPU, FSDP2 on GPUs):

    python examples/qlora_accelerate.py BASE --out adapter/
    ACCELERATE_USE_CPU=true accelerate launch --config_file examples/accelerate/ddp_cpu.yaml \
        examples/qlora_accelerate.py BASE --out adapter/
    accelerate launch --config_file examples/accelerate/fsdp2_gpu.yaml examples/qlora_accelerate.py BASE --out adapter/
    ACCELERATE_USE_CPU=true accelerate launch --config_file examples/accelerate/ddp_cpu.yaml \
        examples/qlora_accelerate.py BASE --out adapter/ --fsdp    # FSDP2 on CPU processes

accelerate runs FSDP on GPUs only; `--fsdp` shards with torch's FSDP2 (`fully_shard`, one unit per
decoder block) itself, which runs on CPU processes too. llmslim's quantized codes are sharded as
they are (FSDP2 shards each parameter on its first dimension; no float storage dtype is needed).

Every step reads the same global batch whatever the number of processes (each process takes its
rows), so a 2-process run's adapter equals a 1-process run's with the same global batch.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from accelerate import Accelerator
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, AutoTokenizer

import llmslim
from llmslim.data import TINY_SHAKESPEARE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", help="a float model folder (e.g. the embedded SmolLM2: python -m llmslim.models)")
    parser.add_argument("--out", required=True, help="folder for the adapter")
    parser.add_argument("--weights", default="nf4", help="llmslim format of the frozen base: nf4, fp4, int4, int8")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--global-batch", type=int, default=4, help="rows per step, split across the processes")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--text", type=Path, default=TINY_SHAKESPEARE)
    parser.add_argument("--no-checkpointing", action="store_true", help="keep every activation (faster, more memory)")
    parser.add_argument("--fsdp", action="store_true", help="shard with torch FSDP2 here (for CPU processes)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    accelerator = Accelerator()
    world, rank = accelerator.num_processes, accelerator.process_index
    if args.global_batch % world:
        parser.error(f"--global-batch {args.global_batch} must be a multiple of the {world} processes")

    tokenizer = AutoTokenizer.from_pretrained(args.base)
    ids = tokenizer(args.text.read_text(encoding="utf-8")[:200_000], return_tensors="pt").input_ids[0]
    blocks = ids[: len(ids) // args.seq_len * args.seq_len].view(-1, args.seq_len)  # (n_blocks, seq_len)

    model = AutoModelForCausalLM.from_pretrained(
        args.base, quantization_config=llmslim.SlimConfig(weights=args.weights), dtype=torch.float32
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=not args.no_checkpointing)
    torch.manual_seed(args.seed)  # the same adapter initialisation on every process
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    if args.fsdp:
        shard(model)
        codes = [p for p in model.parameters() if not p.is_floating_point()]  # the quantized base's codes
        held, whole = sum(p.to_local().nbytes for p in codes), sum(p.numel() * p.element_size() for p in codes)
        print(f"process {rank}: FSDP2 holds {held} of the {whole} bytes of quantized codes", flush=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    if args.fsdp:
        optimizer = accelerator.prepare(optimizer)
    else:
        model, optimizer = accelerator.prepare(model, optimizer)

    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(args.seed))
    per_rank = args.global_batch // world
    model.train()
    for step in range(args.steps):
        rows = order[(step * args.global_batch + rank * per_rank + torch.arange(per_rank)) % len(blocks)]
        batch = blocks[rows].to(accelerator.device)
        loss = model(input_ids=batch, labels=batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        mean = accelerator.reduce(loss.detach(), reduction="mean")
        accelerator.print(f"step {step + 1}/{args.steps} loss {mean.item():.4f}")

    if args.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = accelerator.get_state_dict(model)  # gathered from the shards under accelerate's FSDP
    accelerator.unwrap_model(model).save_pretrained(args.out, state_dict=state, is_main_process=accelerator.is_main_process)
    accelerator.print(f"adapter saved to {args.out}")


def shard(model: torch.nn.Module) -> None:
    """torch FSDP2 over all processes: one unit per decoder block (the classes the model will not split), then the rest."""
    from torch.distributed.fsdp import fully_shard

    blocks = set(model.get_base_model()._no_split_modules or [])
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module)
    fully_shard(model)


if __name__ == "__main__":
    main()
