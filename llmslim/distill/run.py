"""`distill()`: a DistilBERT-style student from a (possibly quantized) teacher, on the shared trainer.

Everything that can be checked from configs, data and the resume checkpoint is checked before a
weight is loaded: layer map, vocabularies, loss weights, data length, output folder, resume
configuration. Then: student copied from the float teacher, teacher loaded (quantized if asked)
in inference mode, `Trainer.fit` with `DistillLoss`, student saved atomically with the tokenizer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer

from llmslim import models
from llmslim.distill.config import DistillConfig
from llmslim.distill.evaluate import make_eval_fn
from llmslim.distill.losses import DistillLoss, LossWeights, Masking
from llmslim.distill.student import check_compatible, check_layer_map, distilbert_layer_map, init_student, student_from_checkpoint
from llmslim.hf.compat import auto_class, detect_objective
from llmslim.memory.trim import release_free_memory
from llmslim.save import atomic_directory, check_output
from llmslim.train.checkpoint import check_resume, check_run_dir
from llmslim.train.config import TrainConfig
from llmslim.train.data import load_splits, prepare_data
from llmslim.train.loop import Trainer, batch_indices, make_accelerator, run_fingerprint

logger = logging.getLogger(__name__)


@dataclass
class DistillPlan:
    """What the configs decide before any weight is loaded."""

    teacher_path: Path
    teacher_config: object
    objective: str  # "causal" or "masked"
    has_head: bool
    layer_map: list[int] | None  # None when starting from a given student
    hidden_pairs: list[tuple[int, int]]

    @property
    def model_class(self):
        return auto_class(self.teacher_config)


@dataclass
class DistillResult:
    """The end of a distillation run.

    Args:
        out: the saved student folder.
        metrics: the final held-out metrics (`eval_perplexity`, and `eval_cosine` for encoders).
        history: the training log records.
        layer_map: teacher layer of each student layer (None for a given student).
        teacher_params / student_params: parameter counts.
        student: the trained student model (in `save_dtype`).
        is_main: whether this is the main process (the one that saved and should print).
    """

    out: Path
    metrics: dict[str, float]
    history: list[dict]
    layer_map: list[int] | None
    teacher_params: int
    student_params: int
    student: torch.nn.Module
    is_main: bool


def distill(config: DistillConfig, train: TrainConfig, *, resume: str | Path | None = None, progress: bool = True) -> DistillResult:
    """Distill `config.teacher` into a smaller student and save it to `config.out`.

    Args:
        config: teacher, student and loss options.
        train: the training loop's options.
        resume: a checkpoint or run folder of an earlier run with the same options.
        progress: tqdm bars on the main process.
    """
    check_output(config.out, overwrite=config.overwrite, inputs=_inputs(config), name="--out")
    check_run_dir(train.run_dir, config.out)
    plan, tokenizer, data = _prepare(config)
    accelerator = make_accelerator(train)
    fingerprint = {**config.fingerprint(), "layer_map": plan.layer_map}
    if resume is not None:
        check_resume(resume, run_fingerprint(fingerprint, train, accelerator, data.train.shape[0]))
    masking = _masking(tokenizer, plan, config)
    weights = LossWeights(config.alpha_kd, config.alpha_lm, config.alpha_cos, config.temperature, config.divergence, config.kd_ratio_end)
    if config.teacher_cache is not None and weights.uses_kd:
        cache = _teacher_cache(config, plan, tokenizer, data.train, train, accelerator, progress)
        student, teacher = load_student(config, plan), None
    else:
        cache = None
        student, teacher = load_models(config, plan, accelerator.device, train.run_dir)
    trainer = Trainer(
        student,
        train,
        data.train,
        DistillLoss(teacher, weights, plan.hidden_pairs, masking, cache),
        eval_fn=make_eval_fn(plan.objective, plan.has_head, data, config.eval_tokens, teacher, masking),
        fingerprint=fingerprint,
        accelerator=accelerator,
        progress=progress,
    )
    result = trainer.fit(resume)
    student = trainer.unwrapped_model().to(getattr(torch, config.save_dtype))
    if accelerator.is_main_process:
        save_student(student, tokenizer, config.out, overwrite=config.overwrite, inputs=_inputs(config))
    accelerator.wait_for_everyone()
    n_teacher = _n_params(teacher) if teacher is not None else _n_params_of(plan.teacher_config)
    return DistillResult(
        config.out, result.final_eval, result.history, plan.layer_map, n_teacher, _n_params(student), student, accelerator.is_main_process
    )


def build_teacher_cache(config: DistillConfig, train: TrainConfig, progress: bool = True):
    """Fill `config.teacher_cache` with the teacher's logits for every training block the run `train` will read, and
    stop there: no student is made (`llmslim distill --cache-only`). Returns the `TeacherCache`."""
    if config.teacher_cache is None:
        raise ValueError("building a teacher cache needs its folder: pass --teacher-cache DIR")
    plan, tokenizer, data = _prepare(config)
    return _teacher_cache(config, plan, tokenizer, data.train, train, make_accelerator(train), progress)


def _prepare(config: DistillConfig):
    """(plan, tokenizer, tokenized data): everything decided before a weight is loaded."""
    plan = plan_distillation(config)
    tokenizer = load_tokenizer(plan)
    splits = load_splits(config.train, config.eval, config.eval_fraction, config.text_field)
    return plan, tokenizer, prepare_data(tokenizer, splits, config.block_size, encoder=plan.objective == "masked")


def plan_distillation(config: DistillConfig) -> DistillPlan:
    """Teacher, objective, layer map and loss checks, from config files only."""
    path = models.resolve(config.teacher)
    teacher_config = AutoConfig.from_pretrained(path)
    objective, has_head = detect_objective(teacher_config)
    objective = objective if config.objective == "auto" else config.objective
    _check_loss_choices(config, path, teacher_config, objective, has_head)
    layer_map = _layer_map(config, teacher_config)
    if config.student is not None:
        check_compatible(teacher_config, AutoConfig.from_pretrained(models.resolve(config.student)), need_hidden=config.alpha_cos > 0)
    return DistillPlan(path, teacher_config, objective, has_head, layer_map, _hidden_pairs(config, layer_map))


def load_tokenizer(plan: DistillPlan):
    """The teacher's tokenizer; its ids must fit the teacher's vocabulary."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(plan.teacher_path)
    except (OSError, ValueError) as err:
        raise ValueError(f"no tokenizer could be loaded from the teacher folder {plan.teacher_path}: save one there ({err})") from err
    vocab = plan.teacher_config.vocab_size
    if len(tokenizer) > vocab:
        raise ValueError(
            f"the tokenizer in {plan.teacher_path} has {len(tokenizer)} tokens, more than the teacher's vocab_size {vocab}: "
            "use the tokenizer the teacher was trained with"
        )
    return tokenizer


def load_models(
    config: DistillConfig, plan: DistillPlan, device: torch.device, run_dir: Path | None = None
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(student in float32, teacher in inference mode on `device`)."""
    float_teacher = _float_teacher(config, plan)
    student = load_student(config, plan, float_teacher)
    if config.teacher_weights == "none" and config.teacher_offload is None:
        return student, float_teacher.to(device).eval().requires_grad_(False)
    del float_teacher
    return student, load_teacher(config, plan, device, run_dir)


def load_student(config: DistillConfig, plan: DistillPlan, float_teacher: torch.nn.Module | None = None) -> torch.nn.Module:
    """The student in float32: the given `config.student`, or the teacher's mapped layers (copied from `float_teacher`,
    or read from the teacher's checkpoint, the rest of the teacher never loaded), compressed if asked."""
    if config.student is not None:
        student = plan.model_class.from_pretrained(models.resolve(config.student), dtype=torch.float32)
    elif float_teacher is not None:
        student = init_student(float_teacher, plan.layer_map)
    else:  # only the layers the student keeps are read
        student = student_from_checkpoint(plan.model_class, plan.teacher_path, plan.teacher_config, plan.layer_map)
    compression = config.student_compression()
    if compression is not None:
        from llmslim.compress import compress_

        compress_(student, compression)
    return student


def load_teacher(config: DistillConfig, plan: DistillPlan, device: torch.device, run_dir: Path | None = None) -> torch.nn.Module:
    """The teacher in inference mode on `device`: float, or through llmslim when it is quantized or offloaded (its
    offloaded blocks written under `run_dir`)."""
    if config.teacher_weights == "none" and config.teacher_offload is None:
        teacher = _float_teacher(config, plan)
    else:
        teacher = _quantized_teacher(plan, config, device, run_dir)
    return teacher.to(device).eval().requires_grad_(False) if config.teacher_offload is None else teacher.eval().requires_grad_(False)


def _float_teacher(config: DistillConfig, plan: DistillPlan) -> torch.nn.Module:
    return plan.model_class.from_pretrained(plan.teacher_path, dtype=config.teacher_dtype or "auto")


def _teacher_cache(config: DistillConfig, plan: DistillPlan, tokenizer, blocks: torch.Tensor, train: TrainConfig, accelerator, progress):
    """The run's teacher cache, holding every training block the run will use: opened and checked, and the blocks it
    lacks computed by the main process (the teacher loaded, run over them once, and freed before the student is made)."""
    from llmslim.distill.cache import CacheKey, TeacherCache

    if plan.objective != "causal":
        raise ValueError("--teacher-cache holds the logits of a causal LM; the teacher is an encoder: distill it without a cache")
    key = CacheKey.of(
        plan.teacher_path, plan.teacher_config, config.teacher_weights, config.teacher_dtype, tokenizer, blocks, config.cache_k,
        config.temperature,
    )  # fmt: skip
    cache = TeacherCache.open(config.teacher_cache, key)  # a mismatch is refused here, before any weight is read
    needed = used_blocks(blocks.shape[0], train, accelerator.num_processes)
    if cache.missing(needed) and accelerator.is_main_process:
        teacher = load_teacher(config, plan, accelerator.device, train.run_dir)
        cache.fill(blocks, needed, teacher, batch_size=train.batch_size, progress=progress)
        del teacher
        release_free_memory()
    accelerator.wait_for_everyone()
    return cache if accelerator.is_main_process else TeacherCache.open(config.teacher_cache, key)


def used_blocks(n_blocks: int, train: TrainConfig, world: int) -> list[int]:
    """Every training block a run of `train.steps` steps reads, on any of its `world` processes (sorted)."""
    used = set()
    for step in range(train.steps):
        for micro in range(train.grad_accum):
            for rank in range(world):
                used.update(batch_indices(n_blocks, step, micro, rank, world, train).tolist())
    return sorted(used)


def save_student(student: torch.nn.Module, tokenizer, out: Path, overwrite: bool, inputs: dict | None = None) -> Path:
    """Save a standard Hugging Face folder (config, safetensors, tokenizer), atomically; `out` kept apart from `inputs` (role: path)."""
    with atomic_directory(out, overwrite, inputs=inputs, name="--out") as tmp:
        student.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def _inputs(config: DistillConfig) -> dict:
    return {"teacher model": config.teacher, "student model": config.student}


def _quantized_teacher(plan: DistillPlan, config: DistillConfig, device: torch.device, run_dir: Path | None) -> torch.nn.Module:
    import llmslim

    offload_dir = None
    if config.teacher_offload == "disk":
        offload_dir = (run_dir or config.out.with_name(config.out.name + "-run")) / "teacher-offload"
        offload_dir.mkdir(parents=True, exist_ok=True)
    return llmslim.from_pretrained(
        plan.teacher_path,
        llmslim.SlimConfig(weights=None if config.teacher_weights == "none" else config.teacher_weights),
        dtype=config.teacher_dtype,
        device_map=str(device),
        offload=config.teacher_offload,
        offload_budget=config.teacher_offload_budget,
        offload_dir=offload_dir,
        progress=False,
    )


def _check_loss_choices(config: DistillConfig, path: Path, hf_config, objective: str, has_head: bool) -> None:
    if not has_head and (config.alpha_kd > 0 or config.alpha_lm > 0):
        raise ValueError(
            f"teacher {path} ({hf_config.architectures}) has no language-modelling head, so there are no logits to distill: "
            "pass --alpha-kd 0 --alpha-lm 0 to distill its hidden states (--alpha-cos)"
        )
    if config.teacher_weights != "none" and objective != "causal":
        raise ValueError(
            f"teacher_weights={config.teacher_weights!r} quantizes causal LMs only; the teacher {path} is an encoder: "
            "use --teacher-weights none"
        )


def _layer_map(config: DistillConfig, hf_config) -> list[int] | None:
    n_teacher = hf_config.num_hidden_layers
    if config.student is not None:
        return None
    if config.student_layer_map is not None:
        return check_layer_map(config.student_layer_map, n_teacher)
    return distilbert_layer_map(n_teacher, config.student_layers or max(1, n_teacher // 2))


def _hidden_pairs(config: DistillConfig, layer_map: list[int] | None) -> list[tuple[int, int]]:
    """(student, teacher) indices into `hidden_states` (0 is the embeddings) for the cosine loss."""
    if config.cos_layers == "last":
        return [(-1, -1)]
    if layer_map is None:
        raise ValueError("cos_layers='mapped' needs a layer map: use --cos-layers last with --student")
    return [(j + 1, i + 1) for j, i in enumerate(layer_map)]


def _masking(tokenizer, plan: DistillPlan, config: DistillConfig) -> Masking | None:
    if plan.objective != "masked":
        return None
    if tokenizer.mask_token_id is None:
        raise ValueError(f"masked-LM distillation needs a [MASK] token, and the tokenizer of {plan.teacher_path} has none")
    return Masking(tokenizer.all_special_ids, tokenizer.mask_token_id, plan.teacher_config.vocab_size, config.mlm_probability)


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _n_params_of(hf_config) -> int:
    """Parameters of the model `hf_config` describes, counted on the meta device."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return _n_params(auto_class(hf_config).from_config(hf_config))
