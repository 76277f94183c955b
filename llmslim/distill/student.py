"""Student initialisation (DistilBERT): the teacher's width, a subset of its layers, its embeddings and head.

The stack of blocks is found generically: the `nn.ModuleList` of `config.num_hidden_layers`
modules of one class holding the most parameters (`model.layers` in Llama, `transformer.h` in
GPT-2, `bert.encoder.layer` in BERT, ...). Per-layer config lists (such as `layer_types`) follow
the same map.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def find_block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, module) of the list of transformer blocks of `model`."""
    n_layers = model.config.num_hidden_layers
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == n_layers and len({type(m) for m in module}) == 1
    ]
    if not candidates:
        raise ValueError(
            f"found no list of {n_layers} blocks (config.num_hidden_layers) in {type(model).__name__}: "
            "distillation needs a model whose layers are an nn.ModuleList"
        )
    return max(candidates, key=lambda item: sum(p.numel() for p in item[1].parameters()))


def distilbert_layer_map(n_teacher: int, n_student: int) -> list[int]:
    """`n_student` teacher layers spread evenly from the first to the last (12 -> 6: [0, 2, 4, 7, 9, 11])."""
    if not 1 <= n_student <= n_teacher:
        raise ValueError(f"student_layers must be between 1 and the teacher's {n_teacher} layers, got {n_student}")
    if n_student == 1:
        return [n_teacher - 1]
    step = (n_teacher - 1) / (n_student - 1)
    return [math.floor(i * step + 0.5) for i in range(n_student)]


def parse_layer_map(text: str) -> list[int]:
    """`"0,2,4"` -> [0, 2, 4]."""
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError as err:
        raise ValueError(f"--student-layer-map must be comma-separated layer indices such as 0,2,4, got {text!r}") from err


def check_layer_map(layer_map: list[int], n_teacher: int) -> list[int]:
    """`layer_map` if every index is a teacher layer; a ValueError naming the bad index otherwise."""
    if not layer_map:
        raise ValueError("the student layer map is empty: give at least one teacher layer index")
    bad = [i for i in layer_map if not isinstance(i, int) or not 0 <= i < n_teacher]
    if bad:
        raise ValueError(f"student layer map {layer_map} has index {bad[0]!r} out of range: the teacher has layers 0..{n_teacher - 1}")
    return list(layer_map)


def student_config(teacher_config, layer_map: list[int]):
    """The teacher's config with `len(layer_map)` layers; per-layer lists follow the map."""
    n_teacher = teacher_config.num_hidden_layers
    config = copy.deepcopy(teacher_config)
    for key, value in list(vars(config).items()):
        if "layer" in key and isinstance(value, (list, tuple)) and len(value) == n_teacher:
            setattr(config, key, type(value)(value[i] for i in layer_map))
    config.num_hidden_layers = len(layer_map)
    return config


def init_student(teacher: nn.Module, layer_map: list[int], dtype: torch.dtype = torch.float32) -> nn.Module:
    """A student of the teacher's class: layer j is a copy of teacher layer `layer_map[j]`; all else copied.

    Args:
        teacher: a float (not quantized) Hugging Face model.
        layer_map: teacher layer index for each student layer.
        dtype: dtype of the student's weights (float32 master weights for training).
    """
    check_layer_map(layer_map, teacher.config.num_hidden_layers)
    prefix, _ = find_block_list(teacher)
    config = student_config(teacher.config, layer_map)
    student = type(teacher)(config).to(dtype)
    student.load_state_dict(mapped_state_dict(teacher.state_dict(), prefix, layer_map), strict=True)
    return student


def student_from_checkpoint(model_class, path, teacher_config, layer_map: list[int], dtype: torch.dtype = torch.float32) -> nn.Module:
    """`init_student` without loading the teacher: the student built by the Auto class `model_class` from
    `student_config`, its tensors read from the teacher's checkpoint folder `path` (only the mapped layers' and the
    shared ones), so the peak is the student's size.

    Raises:
        ValueError: the checkpoint lacks a tensor the student needs (named).
    """
    from llmslim.load import checkpoint_tensors

    check_layer_map(layer_map, teacher_config.num_hidden_layers)
    student = model_class.from_config(student_config(teacher_config, layer_map)).to(dtype)
    prefix, _ = find_block_list(student)
    wanted = set(student.state_dict())
    needed = set(layer_map)

    def keep(key: str) -> bool:
        if not key.startswith(prefix + "."):
            return key in wanted
        return int(key[len(prefix) + 1 :].split(".", 1)[0]) in needed

    state = mapped_state_dict(dict(checkpoint_tensors(path, keep)), prefix, layer_map)
    missing = student.load_state_dict(state, strict=False).missing_keys
    student.tie_weights()
    loaded = {t.data_ptr() for k, t in student.state_dict().items() if k in state}
    absent = [k for k in missing if student.state_dict()[k].data_ptr() not in loaded]  # a tied head shares a loaded tensor
    if absent:
        raise ValueError(f"the teacher checkpoint {path} has no tensor {absent[0]!r} (of {len(absent)} missing): re-save the teacher")
    return student


def mapped_state_dict(state: dict[str, torch.Tensor], prefix: str, layer_map: list[int]) -> dict[str, torch.Tensor]:
    """The teacher's tensors renamed for the student: `prefix.{layer_map[j]}.*` becomes `prefix.{j}.*`."""
    sources: dict[int, list[int]] = {}
    for j, i in enumerate(layer_map):
        sources.setdefault(i, []).append(j)
    mapped = {}
    for key, tensor in state.items():
        if not key.startswith(prefix + "."):
            mapped[key] = tensor
            continue
        index, rest = key[len(prefix) + 1 :].split(".", 1)
        for j in sources.get(int(index), []):
            mapped[f"{prefix}.{j}.{rest}"] = tensor
    return mapped


def check_compatible(teacher_config, student_config, need_hidden: bool) -> None:
    """Teacher and student must share a vocabulary (and a width, for the hidden-state loss)."""
    if teacher_config.vocab_size != student_config.vocab_size:
        raise ValueError(
            f"teacher and student vocabularies differ (teacher vocab_size {teacher_config.vocab_size}, "
            f"student {student_config.vocab_size}): distill into a student that uses the teacher's tokenizer"
        )
    if need_hidden and teacher_config.hidden_size != student_config.hidden_size:
        raise ValueError(
            f"teacher hidden_size {teacher_config.hidden_size} differs from the student's {student_config.hidden_size}: "
            "the cosine loss needs equal widths, so pass --alpha-cos 0"
        )
