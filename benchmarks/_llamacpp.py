"""llama.cpp's own tools on the benchmarks' checkpoints: its HF converter and its quantizer, run once, cached.

bench_speed times llama.cpp (through llama-cpp-python, built from source by `make bench-peers`) on
GGUF files that llama.cpp itself made from the same checkpoints the llmslim cases load:

1. `llama_cpp_source`: `vendor/llama.cpp` of the installed llama-cpp-python's sdist (downloaded once
   with `pip download`), so the converter is the one of the compiled library;
2. its `convert_hf_to_gguf.py` writes the HF folder as a bf16 GGUF (lossless for bf16 weights);
3. `llama_model_quantize`, the library's quantizer (what `llama-quantize` calls), writes Q4_0 / Q8_0
   with llama.cpp's own choices (e.g. the output head of a Q4_0 model in Q6_K).

`prepare_ggufs` (parent side, standard library only) runs these in child processes and keeps the
results under benchmarks/checkpoints/gguf/ (git-ignored); delete a file there to make it again.

A folder without a tokenizer (the random 1.1B checkpoint) is converted from a staging folder that
links its files and adds a Llama tokenizer: the 32000-token SentencePiece vocabulary llama.cpp ships
as `models/ggml-vocab-llama-spm.gguf` (Llama 2's, which TinyLlama uses), written as a transformers
`LlamaTokenizer` with merges derived from its scores (`write_llama_tokenizer`). The benchmark feeds
token ids, so the tokenizer only fills the GGUF's vocabulary.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

from _harness import BENCHMARKS, run_python

PACKAGE = "llama-cpp-python"
GGUF_DIR = BENCHMARKS / "checkpoints" / "gguf"
QUANTS = ("Q4_0", "Q8_0")
SOURCE_FILES = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "models/ggml-vocab-llama-spm.gguf")  # of vendor/llama.cpp
LLAMA_VOCAB = "models/ggml-vocab-llama-spm.gguf"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


# ----------------------------------------------------------------------------- parent side


def llama_cpp_source(timeout: float) -> Path:
    """The installed llama-cpp-python's `vendor/llama.cpp` (converter, gguf-py, vocabularies), unpacked once under GGUF_DIR."""
    version = metadata.version(PACKAGE)  # PackageNotFoundError without llama-cpp-python
    root = GGUF_DIR / f"llama.cpp-{version}"
    if (root / "convert_hf_to_gguf.py").exists():
        return root
    print(f"downloading the {PACKAGE} {version} sdist for llama.cpp's converter (once) ...", file=sys.stderr, flush=True)
    GGUF_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=GGUF_DIR, prefix=".sdist-") as tmp:
        download = [sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps", f"{PACKAGE}=={version}", "-d", tmp]
        run_tool(download, timeout)
        with tarfile.open(next(Path(tmp).glob("*.tar.gz"))) as tar:
            top = tar.getnames()[0].split("/")[0]
            vendor = f"{top}/vendor/llama.cpp/"
            members = [m for m in tar.getmembers() if m.name.startswith(tuple(vendor + f for f in SOURCE_FILES))]
            tar.extractall(tmp, members=members, filter="data")
        os.replace(Path(tmp) / vendor, root)
    return root


def prepare_ggufs(model_dir: Path, quants: tuple[str, ...], timeout: float, threads: int) -> dict[str, Path]:
    """`model_dir` as GGUF files quantized by llama.cpp (quant -> path), converted and quantized once, then reused.

    Args:
        model_dir: a Hugging Face model folder.
        quants: llama.cpp file types, from `QUANTS`.
        timeout: seconds for each step (download, conversion, each quantization).
        threads: quantizer threads.
    """
    if unknown := set(quants) - set(QUANTS):
        raise ValueError(f"quants must be among {QUANTS}, got {sorted(unknown)}")
    stem = f"{model_dir.name}-{folder_digest(model_dir)}"
    files = {quant: GGUF_DIR / f"{stem}.{quant}.gguf" for quant in quants}
    missing = [quant for quant, path in files.items() if not path.exists()]
    if missing:
        source = llama_cpp_source(timeout)
        print(f"converting {model_dir} with llama.cpp to {', '.join(missing)} (once) ...", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(dir=GGUF_DIR, prefix=f".{stem}-") as tmp:
            bf16 = Path(tmp) / f"{stem}.BF16.gguf"  # deleted with the folder: only the quantized files are kept
            folder = with_tokenizer(model_dir, Path(tmp) / "hf", source, timeout)
            convert = [sys.executable, str(source / "convert_hf_to_gguf.py"), str(folder), "--outtype", "bf16", "--outfile", str(bf16)]
            run_tool(convert, timeout)
            for quant in missing:
                part = Path(tmp) / files[quant].name
                code = f"from _llamacpp import quantize; print(quantize({str(bf16)!r}, {str(part)!r}, {quant!r}, {threads}))"
                run_python(f"import sys; sys.path.insert(0, {str(BENCHMARKS)!r})\n{code}", timeout)
                os.replace(part, files[quant])
    return files


def folder_digest(folder: Path) -> str:
    """8 hex digits naming a model folder's version: its path and its files' names, sizes and modification times."""
    digest = hashlib.sha256(str(folder.resolve()).encode())
    for file in sorted(folder.iterdir()):
        stat = file.stat()
        digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:8]


def with_tokenizer(model_dir: Path, staging: Path, source: Path, timeout: float) -> Path:
    """`model_dir` if it has a tokenizer; otherwise `staging`: links to its files plus the Llama tokenizer."""
    if any((model_dir / name).exists() for name in TOKENIZER_FILES):
        return model_dir
    staging.mkdir()
    for file in model_dir.iterdir():
        (staging / file.name).symlink_to(file.resolve())
    code = f"from _llamacpp import write_llama_tokenizer; print(write_llama_tokenizer({str(staging)!r}, {str(source / LLAMA_VOCAB)!r}))"
    run_python(f"import sys; sys.path.insert(0, {str(BENCHMARKS)!r})\n{code}", timeout)
    return staging


def run_tool(cmd: list[str], timeout: float, tail_lines: int = 5) -> None:
    """Run `cmd` from the repository; on failure raise with the last lines of its output."""
    proc = subprocess.run(cmd, cwd=BENCHMARKS.parent, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-tail_lines:])
        raise RuntimeError(f"{Path(cmd[1]).name} exited with {proc.returncode}: {tail}")


# ----------------------------------------------------------------------------- child side


def write_llama_tokenizer(folder: str, vocab_gguf: str) -> str:
    """Write the Llama SentencePiece vocabulary of `vocab_gguf` to `folder` as a transformers `LlamaTokenizer`; returns `folder`.

    Merges are derived from the pieces' scores as transformers does for SentencePiece BPE models
    (`generate_merges`); "Hello this is a test" encodes to Llama 2's ids [15043, 445, 338, 263, 1243].

    Raises:
        ValueError: the folder's model has a vocabulary of another size.
    """
    import json

    from gguf import GGUFReader
    from transformers import LlamaTokenizer
    from transformers.convert_slow_tokenizer import generate_merges

    reader = GGUFReader(vocab_gguf)

    def array(key: str) -> list:  # a GGUF array field: one numpy part per element
        field = reader.fields[f"tokenizer.ggml.{key}"]
        return [field.parts[i] for i in field.data]

    tokens = [bytes(part).decode() for part in array("tokens")]
    scores = [float(part[0]) for part in array("scores")]
    types = [int(part[0]) for part in array("token_type")]
    vocab_size = json.loads((Path(folder) / "config.json").read_text())["vocab_size"]
    if vocab_size != len(tokens):
        raise ValueError(f"{folder}: vocab_size {vocab_size}, the Llama vocabulary {len(tokens)}: give the folder its own tokenizer")
    vocab = {token: i for i, token in enumerate(tokens)}
    normal = {token: score for token, score, kind in zip(tokens, scores, types, strict=True) if kind == 1}  # 1: a normal piece
    LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab, normal)).save_pretrained(folder)
    return folder


def quantize(src: str, dst: str, quant: str, threads: int) -> str:
    """`src` (a 16-bit GGUF) quantized to `quant` by llama.cpp's `llama_model_quantize`, written to `dst`; returns `dst`."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant}")
    params.nthread = threads
    status = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if status != 0:
        raise RuntimeError(f"llama_model_quantize({src!r} -> {quant}) returned {status}")
    return dst
