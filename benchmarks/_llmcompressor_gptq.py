"""Child of bench_quality's `llmcompressor-int4-g64-gptq` case, run by an interpreter that has llm-compressor.

llm-compressor 0.14 pins transformers <= 5.17, so it lives in its own environment (see bench_quality's
`--llmcompressor-python`). This script runs its GPTQ (`GPTQModifier`, its defaults but the scheme: int4, asymmetric,
groups of 64, as llmslim's int4 g64) on the calibration ids it is given (llmslim's: Tiny Shakespeare, 128 x 512,
seed 0) and writes the model with its fake-quantized float weights (what its int4 codes dequantize to) in safetensors,
so that the parent scores it exactly as it scores every other case.

    python _llmcompressor_gptq.py MODEL_DIR CALIBRATION_IDS.pt OUT_DIR
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path


def main(model_dir: str, ids_file: str, out_dir: str) -> None:
    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    ids = torch.load(ids_file, weights_only=True)  # (n, 512)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    weights = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=64)
    recipe = GPTQModifier(config_groups={"int4_g64": QuantizationScheme(targets=["Linear"], weights=weights)}, ignore=["lm_head"])
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    start = time.perf_counter()
    oneshot(model=model, dataset=data, recipe=recipe, max_seq_length=ids.shape[1], num_calibration_samples=ids.shape[0])
    print(f"llm-compressor GPTQ: {time.perf_counter() - start:.0f} s", flush=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {
        name: tensor.detach().to(torch.bfloat16).contiguous()
        for name, tensor in model.state_dict().items()
        if not name.rsplit(".", 1)[-1].startswith(("weight_scale", "weight_zero_point", "weight_g_idx", "input_", "output_"))
    }
    state.pop("lm_head.weight", None)  # tied to the embedding
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    for name in ("config.json", "generation_config.json"):
        if (Path(model_dir) / name).exists():
            shutil.copy(Path(model_dir) / name, out / name)


if __name__ == "__main__":
    main(*sys.argv[1:4])
