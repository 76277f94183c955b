"""Saving compressed models: llmslim's own layout, or bitsandbytes' layout for stock transformers.

Every llmslim writer (quantize, merge, distill, finetune, compress, training checkpoints) goes
through `atomic_directory`, which never loses what it did not write:

- OUT is written into `.OUT.tmp-<host>-<pid>-<token>` next to it and renamed at the end, so a
  crash never leaves a half-written model under the final name.
- OUT may not be, contain or lie inside an input of the run (the model read, an adapter):
  `check_output` refuses it before any work is done.
- An existing OUT is replaced (`overwrite`) only if it is a folder llmslim's writers could have
  written (`check_replaceable`): a real folder (not a link) that is empty, or holds config.json,
  adapter_config.json or trainer_state.json and otherwise only regular files named as those writers
  name them (`OWN_FILES`, `*.safetensors`, and peft's README.md beside adapter_config.json).
  Anything else there (a subfolder, a link, any other file) makes the overwrite an error naming it.
- The old OUT is renamed to `.OUT.old-<host>-<pid>-<token>` and removed only once the new one is
  in place.
- The next write of OUT removes those leftovers (and `.OUT.del-*`, a folder `discard` was deleting)
  of a process of this host that no longer runs (killed, or crashed), and puts an old OUT back if
  it was moved aside and its replacement never arrived.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

from llmslim.hf import compat
from llmslim.procs import process_running
from llmslim.quant import kernels
from llmslim.quant.experts import quantized_experts
from llmslim.quant.modules import SlimLinear, SlimLinear4bit, SlimLinear8bit, quantizable, quantized_layers
from llmslim.quant.registry import BNB_FORMATS

logger = logging.getLogger(__name__)

SAVE_FORMATS = ("llmslim", "bnb")

# What llmslim's writers put in a folder (model.save_pretrained, tokenizers, peft adapters, checkpoints).
MARKER_FILES = ("config.json", "adapter_config.json", "trainer_state.json")
OWN_FILES = frozenset(
    {
        *MARKER_FILES,
        "generation_config.json",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "chat_template.jinja",
        "chat_template.json",
        "tokenizer.model",
        "spiece.model",
        "vocab.json",
        "vocab.txt",
        "merges.txt",
        "llmslim_finetune.json",
    }
)
OWN_PATTERNS = ("*.safetensors",)
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old|del)-(?P<host>.+)-(?P<pid>\d+)-(?P<token>[a-z0-9_]{8})$")


def save_pretrained(
    model: torch.nn.Module,
    out: str | os.PathLike,
    *,
    format: str = "llmslim",
    overwrite: bool = False,
    tokenizer=None,
    max_shard_size: str = "2GB",
) -> Path:
    """Save a model loaded by llmslim.

    Args:
        model: the model.
        out: target folder; must not exist unless `overwrite`, and must be apart from the folder the
            model was loaded from.
        format: `"llmslim"` (reloads with `import llmslim`) or `"bnb"` (stock transformers +
            bitsandbytes load it with no llmslim import).
        overwrite: replace an existing `out` if it is a model folder llmslim could have written
            (see this module's docstring); anything else there makes it an error.
        tokenizer: saved alongside when given.
        max_shard_size: largest safetensors shard.

    Returns:
        The folder written.
    """
    if format not in SAVE_FORMATS:
        raise ValueError(f"format must be one of {list(SAVE_FORMATS)}, got {format!r}")
    with atomic_directory(out, overwrite, inputs={"model folder it was loaded from": _loaded_from(model)}) as tmp:
        if format == "llmslim":
            model.save_pretrained(tmp, max_shard_size=max_shard_size)
        else:
            _save_bnb(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out)


@contextmanager
def atomic_directory(
    out: str | os.PathLike, overwrite: bool, *, inputs: Mapping[str, str | os.PathLike | None] | None = None, name: str = "output folder"
) -> Iterator[Path]:
    """Yield a temporary folder that becomes `out` only if the block finishes.

    Args:
        out: the folder to write.
        overwrite: replace an existing `out` (only one llmslim could have written: `check_replaceable`).
        inputs: what the run reads, by role (`{"input model folder": path}`); `out` must stay apart from each.
        name: what messages call `out` (`"--out"`).

    Raises:
        ValueError / FileExistsError: as `check_output`, before the block runs.
    """
    out = check_output(out, overwrite=overwrite, inputs=inputs, name=name)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{_owner()}-", dir=out.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private
        _publish(tmp, out, overwrite)
    finally:
        if tmp.exists():
            _remove_tree(tmp)


def check_output(
    out: str | os.PathLike, *, overwrite: bool, inputs: Mapping[str, str | os.PathLike | None] | None = None, name: str = "output folder"
) -> Path:
    """Refuse an output folder that cannot or must not be written, before any work is done; clean leftovers.

    Args:
        out: the folder to write.
        overwrite: whether an existing `out` may be replaced.
        inputs: what the run reads, by role; `out` may not be, contain or lie inside any of them.
        name: what messages call `out` (`"--out"`).

    Returns:
        `out` as a Path.

    Raises:
        ValueError: `out` names no new folder (`""`, `"."`, `".."`), its parent is a file, it overlaps
            an input, or it exists and is not a folder llmslim could have written.
        FileExistsError: `out` exists and `overwrite` is false.
    """
    out = _check_name(out, name)
    for role, path in (inputs or {}).items():
        if path is not None:
            _check_apart(out, Path(path), role, name)
    _check_parent(out, name)
    clean_leftovers(out)
    if os.path.lexists(out):
        if not overwrite:
            raise FileExistsError(f"{out} already exists: choose another {name} or pass --overwrite (overwrite=True)")
        check_replaceable(out)
    return out


def check_replaceable(out: str | os.PathLike) -> None:
    """Raise unless `out` is a folder llmslim may replace: empty, or a model folder its writers could have written.

    Raises:
        ValueError: naming what is there that llmslim did not write.
    """
    out = Path(out)
    keep = "so --overwrite (overwrite=True) does not delete it"
    if out.is_symlink():
        raise ValueError(f"{out} is a link to {os.readlink(out)}, {keep}: remove the link, or choose another output folder")
    if not out.is_dir():
        raise ValueError(f"{out} is a file, not a model folder, {keep}: move it away, or choose another output folder")
    names = sorted(os.listdir(out))
    unexpected = _unexpected_entries(out, names)
    if unexpected:
        raise ValueError(
            f"{out} holds what llmslim's writers do not write ({_listing(unexpected)}), {keep}: "
            "move those elsewhere, or choose another output folder"
        )
    if names and not any(marker in names for marker in MARKER_FILES):
        raise ValueError(
            f"{out} is not a model folder (no {', '.join(MARKER_FILES[:-1])} or {MARKER_FILES[-1]}; it holds {_listing(names)}), {keep}: "
            "move those elsewhere, or choose another output folder"
        )


def clean_leftovers(out: str | os.PathLike) -> None:
    """Remove what interrupted writes of `out` left beside it, and put an old `out` back if its replacement never arrived.

    Only `.OUT.tmp-*` / `.OUT.old-*` / `.OUT.del-*` folders of processes of this host that no longer run are touched.
    """
    out = Path(out)
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(?P<kind>tmp|old|del)-(?P<host>.+)-(?P<pid>\d+)-(?P<token>[a-z0-9_]{{8}})$")
    stale = [(m["kind"], path) for path, m in _matching(out.parent, pattern) if _is_stale(m)]
    old = sorted((path for kind, path in stale if kind == "old"), key=_mtime)
    if old and not os.path.lexists(out):
        try:
            os.replace(old[-1], out)
            logger.warning("put %s back: a write of it was interrupted after moving it aside to %s", out, old[-1].name)
        except OSError as err:  # another process restored it first
            logger.info("could not put %s back from %s: %s", out, old[-1], err)
    for _, path in stale:
        if os.path.lexists(path):
            logger.info("removing %s, left by an interrupted write of %s", path, out)
            _remove_tree(path)


def discard(path: str | os.PathLike) -> None:
    """Delete a folder llmslim wrote, renaming it to `.NAME.del-*` first.

    A kill partway then never leaves it half-deleted under its own name; the next write of NAME removes the rest.
    """
    path = Path(path)
    doomed = path.with_name(f".{path.name}.del-{_owner()}-{uuid.uuid4().hex[:8]}")
    os.replace(path, doomed)
    _remove_tree(doomed)


def leftover_names(folder: str | os.PathLike) -> set[str]:
    """Names of the folders in `folder` whose writes left `.NAME.tmp-*` / `.NAME.old-*` / `.NAME.del-*` leftovers there."""
    return {m["name"] for _, m in _matching(Path(folder), _LEFTOVER)}


def _check_name(out: str | os.PathLike, name: str) -> Path:
    text = os.fspath(out)
    if not str(text).strip():
        raise ValueError(f"the {name} is empty ({text!r}): give a folder name, such as 'model-nf4'")
    path = Path(text)
    if path.name in ("", ".", ".."):
        raise ValueError(
            f"the {name} {str(text)!r} names an existing folder ('.', '..' or /), not a new one: give a folder name, such as 'model-nf4'"
        )
    return path


def _check_apart(out: Path, other: Path, role: str, name: str) -> None:
    real_out, real_other = out.resolve(), other.resolve()
    if real_out == real_other:
        problem = f"is the {role} ({other}): writing there would replace it"
    elif real_other in real_out.parents:
        problem = f"is inside the {role} {other}: writing there would change it"
    elif real_out in real_other.parents:
        problem = f"contains the {role} {other}: replacing {out} would delete it"
    else:
        return
    suggestion = real_other.parent / f"{real_other.stem}-slim"
    raise ValueError(f"the {name} {out} {problem}; choose another {name}, apart from {other}, such as {suggestion}")


def _check_parent(out: Path, name: str) -> None:
    for parent in out.absolute().parents:
        if parent.exists():  # the nearest existing one
            if not parent.is_dir():
                raise ValueError(f"cannot create the {name} {out}: {parent} is a file, not a folder: choose an {name} in a folder")
            return


def _unexpected_entries(folder: Path, names: list[str]) -> list[str]:
    unexpected = []
    for entry in names:
        path = folder / entry
        if path.is_symlink():
            unexpected.append(f"{entry} (a link)")
        elif path.is_dir():
            unexpected.append(f"{entry}/")
        elif not path.is_file() or not _own_file(entry, names):
            unexpected.append(entry)
    return unexpected


def _own_file(entry: str, names: list[str]) -> bool:
    if entry == "README.md":  # peft writes one beside each adapter
        return "adapter_config.json" in names
    return entry in OWN_FILES or any(fnmatch.fnmatchcase(entry, pattern) for pattern in OWN_PATTERNS)


def _listing(entries: list[str], limit: int = 5) -> str:
    shown = ", ".join(entries[:limit])
    return shown if len(entries) <= limit else f"{shown} and {len(entries) - limit} more"


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename `tmp` to `out`; an existing `out` (checked again: it may have changed meanwhile) is moved aside, removed last."""
    if not os.path.lexists(out):
        os.replace(tmp, out)
        return
    try:
        if not overwrite:
            raise FileExistsError(f"{out} was created while llmslim was writing it")
        check_replaceable(out)
    except (FileExistsError, ValueError) as err:
        kept = out.with_name(f"{out.name}.new-{uuid.uuid4().hex[:8]}")
        os.replace(tmp, kept)
        raise type(err)(f"{err}; what llmslim wrote is in {kept}") from None
    old = out.with_name(f".{out.name}.old-{_owner()}-{uuid.uuid4().hex[:8]}")
    os.replace(out, old)
    try:
        os.replace(tmp, out)  # if the process dies right before this, the next write of `out` puts `old` back
    except OSError:
        os.replace(old, out)
        raise
    # renamed again before deleting: a kill partway must not leave a half-deleted `.old-` that a later run would put back
    doomed = out.with_name(f".{out.name}.del-{_owner()}-{uuid.uuid4().hex[:8]}")
    os.replace(old, doomed)
    _remove_tree(doomed)


def _loaded_from(model: torch.nn.Module) -> Path | None:
    source = getattr(model, "name_or_path", None)
    return Path(source) if isinstance(source, str) and source and os.path.exists(source) else None


def _owner() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _matching(folder: Path, pattern: re.Pattern) -> Iterator[tuple[Path, re.Match]]:
    if not folder.is_dir():
        return
    for entry in os.listdir(folder):
        match = pattern.match(entry)
        if match:
            yield folder / entry, match


def _is_stale(match: re.Match) -> bool:
    return match["host"] == socket.gethostname() and not process_running(int(match["pid"]))


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:  # removed meanwhile by another process cleaning up
        return -1


def _remove_tree(path: Path) -> None:
    try:
        if path.is_symlink() or not path.is_dir():
            path.unlink(missing_ok=True)
        else:
            shutil.rmtree(path)
    except FileNotFoundError:  # removed meanwhile by another process cleaning up
        pass
    except OSError as err:  # what is left is cleaned up by the next write
        logger.warning("could not remove %s: %s", path, err)


def bnb_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors named as bitsandbytes' `Linear4bit` / `Linear8bitLt` save them."""
    tied = set(compat.tied_weights(model))
    quantized = {name: layer for name, layer in model.named_modules() if isinstance(layer, SlimLinear)}
    state = {}
    for key, tensor in model.state_dict().items():
        module_name = key.rpartition(".")[0]
        if key in tied or module_name in quantized:
            continue
        state[key] = tensor
    for name, layer in quantized.items():
        state.update({f"{name}.{k}": v for k, v in _bnb_layer_tensors(layer).items()})
    return {k: v.contiguous() for k, v in state.items()}


def _bnb_layer_tensors(layer: SlimLinear) -> dict[str, torch.Tensor]:
    tensors = {} if layer.bias is None else {"bias": layer.bias.data}
    if isinstance(layer, SlimLinear4bit):
        stored = layer.four_bit_weight()  # the stored layout, also while the layer runs in the CPU one
        qs = kernels.quant_state(stored, layer.compute_dtype)
        tensors["weight"] = stored.codes
        # code tables are shared between layers in memory; safetensors wants each tensor once
        tensors.update({f"weight.{k}": v.clone() if "quant_map" in k else v for k, v in qs.as_dict(packed=True).items()})
    elif isinstance(layer, SlimLinear8bit):
        tensors.update(weight=layer.weight.data, SCB=layer.SCB, weight_format=torch.tensor(0, dtype=torch.uint8))
    else:  # pragma: no cover - every format module is handled above
        raise TypeError(f"no bitsandbytes layout for {type(layer).__name__}")
    return tensors


def bnb_quantization_config(model: torch.nn.Module) -> dict:
    """The `BitsAndBytesConfig` (as a dict) that makes transformers rebuild this model's layers."""
    from transformers import BitsAndBytesConfig

    config = model.config.quantization_config
    skip = [name for name, module in model.named_modules() if quantizable(module)]
    compute_dtype = config.torch_compute_dtype or next(layer.compute_dtype for _, layer in quantized_layers(model))
    if config.is_4bit:
        bnb = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=config.weights,
            bnb_4bit_use_double_quant=config.double_quant,
            bnb_4bit_compute_dtype=compute_dtype,
            llm_int8_skip_modules=skip,
        )
    else:
        bnb = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=config.int8_threshold, llm_int8_skip_modules=skip)
    return bnb.to_dict()


def _save_bnb(model: torch.nn.Module, folder: Path) -> None:
    if not any(True for _ in quantized_layers(model)):
        raise ValueError("the model has no llmslim quantized layers: there is nothing to export in bitsandbytes format")
    experts = next((name for name, _ in quantized_experts(model)), None)
    if experts is not None:
        raise ValueError(
            f"bitsandbytes has no layout for quantized mixture-of-experts weights ({experts} holds every expert of a layer "
            "stacked): transformers + bitsandbytes leaves fused experts in float, so no stock loader reads them. Save in "
            "llmslim's layout (format='llmslim', the default), which `import llmslim` + from_pretrained loads"
        )
    weights = model.config.quantization_config.weights
    if weights not in BNB_FORMATS:
        raise ValueError(
            f"bitsandbytes has no format {weights!r} (it stores {list(BNB_FORMATS)}): save in llmslim's layout (format='llmslim'), "
            "or quantize with one of those formats"
        )
    int8 = [name for name, layer in quantized_layers(model) if isinstance(layer, SlimLinear8bit)]
    if weights != "int8" and int8:
        raise ValueError(
            f"bitsandbytes loads one format per model, and {_listing(int8)} of this {weights} model are int8 "
            "(int8_layers / bits_per_param): save in llmslim's layout (format='llmslim', the default), or quantize "
            "without int8_layers and bits_per_param"
        )
    config = copy.deepcopy(model.config)
    config.quantization_config = bnb_quantization_config(model)
    config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    _write_shards(bnb_state_dict(model), folder)


def _write_shards(state: dict[str, torch.Tensor], folder: Path, max_bytes: int = 2 * 1024**3) -> None:
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(state, max_shard_size=max_bytes)
    for filename, keys in split.filename_to_tensors.items():
        save_file({k: state[k] for k in keys}, str(folder / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
