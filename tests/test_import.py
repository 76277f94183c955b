"""`import llmslim` stays light: no bitsandbytes, no CUDA initialisation."""

import subprocess
import sys


def test_import_is_light():
    code = (
        "import sys, torch, llmslim\n"
        "assert 'bitsandbytes' not in sys.modules, 'bitsandbytes imported'\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised'\n"
        "assert 'fastapi' not in sys.modules\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr


def test_registration_is_visible_to_transformers():
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    import llmslim
    from llmslim.hf.quantizer import SlimHfQuantizer, register

    register()  # idempotent
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["llmslim"] is llmslim.SlimConfig
    assert AUTO_QUANTIZER_MAPPING["llmslim"] is SlimHfQuantizer
