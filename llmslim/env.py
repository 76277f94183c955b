"""`llmslim env`: versions, devices and which kernel backend each operation uses."""

from __future__ import annotations

import platform
from importlib import metadata

PACKAGES = ("llmslim", "torch", "transformers", "accelerate", "bitsandbytes", "safetensors", "gguf", "tqdm")


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def environment_report() -> dict[str, str]:
    """What `llmslim env` prints, as an ordered dict of label -> value."""
    import torch

    from llmslim import models
    from llmslim.quant import kernels, native

    report = {"python": platform.python_version(), "platform": platform.platform()}
    report.update({name: _version(name) for name in PACKAGES})
    report["cpu capability"] = torch.backends.cpu.get_cpu_capability()
    report["cpu threads"] = str(torch.get_num_threads())
    cuda = torch.cuda.is_available()
    report["cuda"] = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) if cuda else "not available"
    lib = native.load()
    report["4-bit quantize (cpu)"] = f"llmslim C kernel ({lib._name})" if lib is not None else "pure torch (no C compiler)"
    ops = native.load_ops()
    avx2 = ops and kernels._i16_kernel()  # the AVX2 build
    isa = "AVX2" if avx2 else "AVX-512 BF16"
    table = f"llmslim operators ({isa}) for <= 32 tokens, else dequantize + torch GEMM" if ops else "dequantize + torch GEMM"
    if kernels.decode_kernels():
        cpu_kernel = "llmslim gemv_4bit_cpu_layout (AVX-512 BF16, 32-row layout) in bf16; else " + table
    else:
        cpu_kernel = "bitsandbytes CPU kernel (AVX-512 BF16, 32-row layout) in bf16; else " + table
    if avx2:
        cpu_kernel = "llmslim mm_4bit_i16 (AVX2, 16-bit integer levels) for <= 32 bf16/fp16 tokens; else " + table
    report["nf4/fp4 matmul (cpu)"] = cpu_kernel if kernels.cpu_packable((32, 64), 64) or avx2 else table
    report["int4 matmul (cpu)"] = table.replace("AVX-512 BF16", "AVX-512 VNNI/BF16")
    int8pack = "torch._weight_int8pack_mm" if hasattr(torch, "_weight_int8pack_mm") else "dequantize + torch GEMM"
    decode8 = "llmslim gemv_int8_rows (AVX-512 VNNI or AVX2) in bf16, else " if kernels.int8_rows_kernel() else ""
    report["int8 matmul (cpu)"] = f"{decode8}{int8pack}; prompts: LLM.int8 on torch._int_mm"
    report["4-bit / int8 (cuda)"] = "bitsandbytes CUDA kernels" if cuda else "n/a (no GPU)"
    try:
        report["default model"] = str(models.default_gguf())
    except FileNotFoundError as err:
        report["default model"] = f"missing: {err}"
    return report
