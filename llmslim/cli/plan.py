"""`llmslim plan MODEL_OR_CONFIG`: will it fit, in which format, and how fast can it decode at best."""

from __future__ import annotations

import argparse
import json

from llmslim.cli._args import config_from_args

NAME = "plan"
HELP = "memory and speed of a model in every format on given hardware, from its config.json alone"
EXAMPLES = (
    "llmslim plan bloom-176b --gpu 24GiB --cpu 64GiB --disk 2TB --context 2048",
    "llmslim plan llama-2-70b --gpu 2x24GiB --train --parallel fsdp --context 1024   # QLoRA on two GPUs: memory per GPU",
)
BANDWIDTH_DEFAULTS = {"gpu": "1000GB/s", "pcie": "25GB/s", "cpu": "25GB/s", "disk": "3GB/s"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from llmslim.plan.known import KNOWN_CONFIGS
    from llmslim.plan.memory import OPTIMIZER_BYTES, PARALLEL_MODES

    p.add_argument("model", metavar="MODEL_OR_CONFIG", help=f"model folder, config.json, or a bundled name: {', '.join(KNOWN_CONFIGS)}")
    p.add_argument(
        "--gpu", action="append", default=None, help="GPU memory, repeatable or NxSIZE (e.g. --gpu 24GiB --gpu 2x80GB); default: detected"
    )
    p.add_argument("--cpu", default=None, help="host memory llmslim may use (default: this machine's RAM)")
    p.add_argument("--disk", default=None, help="free disk for offloaded layers (default: free space here)")
    p.add_argument("--context", type=int, default=4096, help="tokens per sequence (default 4096)")
    p.add_argument("--batch", type=int, default=1, help="sequences at once (default 1)")
    p.add_argument("--train", action="store_true", help="QLoRA fine-tuning: LoRA state, gradients, optimizer, checkpointed activations")
    p.add_argument("--lora-rank", type=int, default=16, help="LoRA rank with --train (default 16)")
    p.add_argument("--optimizer", choices=list(OPTIMIZER_BYTES), default="adamw", help="optimizer with --train (default adamw)")
    p.add_argument(
        "--parallel",
        choices=list(PARALLEL_MODES),
        default="none",
        help="with --train: none (one process), ddp or fsdp (one process per GPU; per-process memory)",
    )
    p.add_argument("--processes", type=int, default=None, help="with --parallel: processes (default one per GPU, else 1)")
    p.add_argument("--dtype", default=None, help="float dtype of unquantized parts (default: the config's)")
    for tier, default in BANDWIDTH_DEFAULTS.items():
        p.add_argument(f"--{tier}-bandwidth", default=default, help=f"{tier} read bandwidth for the tokens/s bound (default {default})")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--tensors", metavar="FORMAT", default=None, help="with --json: also list every tensor's bytes in FORMAT")


def run(args: argparse.Namespace) -> int:
    """Print the plan (table, or JSON with --json); 0 on success."""
    from llmslim.plan.hardware import parse_bandwidth, parse_gpus, parse_size, this_machine
    from llmslim.plan.planner import Workload, plan_model, tensor_table
    from llmslim.plan.report import render

    bandwidth = {t: parse_bandwidth(getattr(args, f"{t}_bandwidth")) for t in BANDWIDTH_DEFAULTS}
    hardware = this_machine(
        gpus=None if args.gpu is None else parse_gpus(args.gpu),
        cpu=None if args.cpu is None else parse_size(args.cpu),
        disk=None if args.disk is None else parse_size(args.disk),
        bandwidth=bandwidth,
    )
    workload = config_from_args(Workload, args)
    plan = plan_model(args.model, hardware, workload)
    if not args.json:
        print(render(plan))
        return 0
    report = plan.to_dict()
    if args.tensors:
        report["tensors"] = {args.tensors: tensor_table(plan.shape, args.tensors, plan.dtype)}
    print(json.dumps(report, indent=2))
    return 0
