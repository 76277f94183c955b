"""Resumable checkpoints: trainable weights and optimizer state as safetensors, the rest as JSON.

A checkpoint is a folder `step-NNNNNNN/` under `<run_dir>/checkpoints/`, written into a temporary
folder and renamed, holding `model.safetensors` (trainable parameters), `optimizer.safetensors`
(optimizer tensors) and `trainer_state.json` (step, run fingerprint, optimizer scalars and groups).
Nothing is pickled, so loading runs no code. Pruning old checkpoints deletes only folders named
`step-N` that hold nothing but those three files; leftovers of a write that was interrupted
(`.step-N.tmp-*`, `.step-N.old-*`, `.step-N.del-*`) are removed by the next save.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from llmslim.save import atomic_directory, clean_leftovers, discard, leftover_names

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
FORMAT_VERSION = 1
CHECKPOINT_FILES = frozenset({STATE_FILE, MODEL_FILE, OPTIMIZER_FILE})
_STEP = re.compile(r"^step-(\d{7,})$")


@dataclass
class Checkpoint:
    """What a checkpoint folder holds, read back."""

    path: Path
    step: int
    fingerprint: dict
    weights: dict[str, torch.Tensor]
    optimizer: dict
    scaler: dict | None


def normalize(fingerprint: dict) -> dict:
    """`fingerprint` as it reads back from JSON (tuples as lists, paths as strings)."""
    return json.loads(json.dumps(fingerprint, default=str))


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    """The folder of the checkpoint after `step` optimizer steps."""
    return Path(run_dir) / "checkpoints" / f"step-{step:07d}"


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters of `model` by name (tied parameters once), as contiguous CPU copies."""
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizer, fingerprint: dict, scaler=None, keep: int = 2) -> Path:
    """Write the checkpoint after `step` steps atomically; keep only the `keep` newest."""
    target = checkpoint_dir(run_dir, step)
    tensors, scalars = _flatten_optimizer(optimizer.state_dict())
    state = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "fingerprint": normalize(fingerprint),
        "optimizer": scalars,
        "scaler": None if scaler is None else scaler.state_dict(),
    }
    with atomic_directory(target, overwrite=True) as tmp:
        save_file(trainable_state(model), str(tmp / MODEL_FILE))
        save_file(tensors, str(tmp / OPTIMIZER_FILE))
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
    _prune(Path(run_dir) / "checkpoints", keep)
    return target


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder `path` names: a checkpoint itself, or a run folder (its newest checkpoint)."""
    path = Path(path).expanduser()
    if (path / STATE_FILE).is_file():
        return path
    found = [folder for _, folder in _step_folders(path / "checkpoints") if (folder / STATE_FILE).is_file()]
    if not found:
        raise ValueError(f"--resume {str(path)!r} is neither a checkpoint folder (with {STATE_FILE}) nor a run folder with checkpoints/")
    return found[-1]


def check_run_dir(run_dir: str | Path | None, out: str | Path) -> None:
    """Refuse a run folder that is the output folder or lies inside it: writing the output would replace its checkpoints."""
    if run_dir is None:
        return
    real_run, real_out = Path(run_dir).resolve(), Path(out).resolve()
    if real_run == real_out or real_out in real_run.parents:
        raise ValueError(
            f"the run folder {run_dir} (checkpoints, log) is inside the output folder {out}, which saving replaces: "
            f"use a --run-dir outside it, such as {real_out.parent / (real_out.name + '-run')} (the default)"
        )


def check_resume(path: str | Path, fingerprint: dict) -> Path:
    """The checkpoint to resume from, after checking that it was made with the same configuration.

    Raises:
        ValueError: naming each value that differs, before anything is trained.
    """
    found = find_checkpoint(path)
    state = json.loads((found / STATE_FILE).read_text())
    saved, now = state.get("fingerprint", {}), normalize(fingerprint)
    keys = sorted(set(saved) | set(now))
    diffs = [f"{key}: checkpoint {saved.get(key)!r}, now {now.get(key)!r}" for key in keys if saved.get(key) != now.get(key)]
    if diffs:
        raise ValueError(
            f"cannot resume from {found}: it was made with another configuration ({'; '.join(diffs)}); "
            "resume with the options of that run, or start a new run without --resume"
        )
    return found


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint folder (safetensors and JSON only)."""
    path = Path(path)
    state = json.loads((path / STATE_FILE).read_text())
    optimizer = _unflatten_optimizer(load_file(str(path / OPTIMIZER_FILE)), state["optimizer"])
    return Checkpoint(path, state["step"], state["fingerprint"], load_file(str(path / MODEL_FILE)), optimizer, state.get("scaler"))


def restore_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy checkpointed trainable parameters into `model`; every trainable parameter must be present."""
    params = dict(model.named_parameters())
    expected = {name for name, p in params.items() if p.requires_grad}
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights))[:3], sorted(set(weights) - expected)[:3]
        raise ValueError(f"checkpoint weights do not fit the model (missing {missing}, unexpected {extra}): resume the same model")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for index, values in state_dict["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"scalars": scalars, "param_groups": state_dict["param_groups"]}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], saved: dict) -> dict:
    state: dict[int, dict] = {}
    for flat, value in list(tensors.items()) + list(saved["scalars"].items()):
        index, key = flat.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": saved["param_groups"]}


def _prune(folder: Path, keep: int) -> None:
    """Delete all but the `keep` newest checkpoints, and what interrupted saves left; nothing llmslim did not write."""
    for name in leftover_names(folder):
        if _STEP.match(name):
            clean_leftovers(folder / name)
    own = [path for _, path in _step_folders(folder) if _is_checkpoint(path)]
    for old in own[: max(0, len(own) - keep)]:
        try:
            discard(old)
        except OSError as err:  # a checkpoint not pruned must not stop the training
            logger.warning("could not delete the old checkpoint %s: %s", old, err)


def _step_folders(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of the `step-N` folders in `folder`, oldest first (by step, not by name)."""
    if not folder.is_dir():
        return []
    found = ((_STEP.match(path.name), path) for path in folder.iterdir())
    return sorted((int(match[1]), path) for match, path in found if match)


def _is_checkpoint(path: Path) -> bool:
    """Whether `path` is a checkpoint folder as `save_checkpoint` writes them: a real folder of exactly those files."""
    if path.is_symlink() or not path.is_dir():
        return False
    names = {p.name for p in path.iterdir()}
    ours = STATE_FILE in names and names <= CHECKPOINT_FILES and all((path / n).is_file() and not (path / n).is_symlink() for n in names)
    if not ours:
        logger.warning("not deleting %s when pruning old checkpoints: it holds files a checkpoint does not (%s)", path, sorted(names))
    return ours
