"""`compress_model()`: compress a pretrained model (`llmslim.compress`), heal it by distillation from the original, save it.

The student is the original model in float32, compressed in memory (`compress_`); the teacher is
the original model (quantized if asked, causal LMs only). A causal LM heals on DistilBERT's triple
loss; an encoder (a bare BertModel such as all-MiniLM-L6-v2) on the cosine of its last hidden
states alone, scored by the cosine of mean-pooled embeddings. The distillation trainer (`llmslim.distill.losses`,
`llmslim.train`) then trains only the compressed parts (the embedding factors and the shared
blocks' weights) unless `train_all`. The healed student is optionally quantized and saved in
llmslim's layout, so both doors reload it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoTokenizer

from llmslim import models
from llmslim.compress.apply import compress_, table_config
from llmslim.compress.embedding import FactorizedEmbedding
from llmslim.config import SlimConfig
from llmslim.hf import compat
from llmslim.quant.registry import weight_choices
from llmslim.train.config import TrainConfig


@dataclass
class HealConfig:
    """A compress (and heal) run.

    Args:
        out: folder of the compressed model (llmslim layout, with the tokenizer).
        model: local Hugging Face folder or .gguf; None is the embedded default model.
        compression: the SlimConfig to apply: compression fields, and `weights` to quantize the
            healed model before saving (`None` keeps it in float).
        heal_steps: distillation steps after compressing (0: compress and save only).
        train: training text (file, .jsonl or dataset folder) for healing.
        train_all: train every parameter, not only the compressed parts.
        teacher_weights: `"none"` (float teacher) or a format to quantize the teacher with.
        alpha_kd / alpha_lm / alpha_cos / temperature: distillation loss weights (an encoder uses alpha_cos alone).
        block_size / eval_tokens: tokens per training block, held-out tokens per evaluation.
        save_dtype: dtype of the saved float tensors.
        heal_quantized: quantize the student's layers to `compression.weights` before healing
            (not after), so that the trained parts also absorb the quantization error.
        overwrite: replace `out`.
    """

    out: Path
    model: str | Path | None = None
    compression: SlimConfig = dataclasses.field(default_factory=lambda: SlimConfig(weights=None))
    heal_steps: int = 0
    train: str | Path | None = None
    train_all: bool = False
    teacher_weights: str = "none"
    alpha_kd: float = 5.0
    alpha_lm: float = 2.0
    alpha_cos: float = 1.0
    temperature: float = 2.0
    block_size: int = 256
    eval_tokens: int = 20_000
    save_dtype: str = "float32"
    heal_quantized: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if not self.compression.compresses:
            raise ValueError(
                "nothing to compress: give embedding_rank / embedding_energy (--embedding-rank) or share_layers (--share-layers)"
            )
        if isinstance(self.heal_steps, bool) or not isinstance(self.heal_steps, int) or self.heal_steps < 0:
            raise ValueError(f"heal_steps must be an integer >= 0, got {self.heal_steps!r}")
        if self.heal_steps and not self.train:
            raise ValueError(f"heal_steps={self.heal_steps} needs training text: pass train (--train FILE)")
        if self.heal_quantized and self.compression.weights is None:
            raise ValueError("heal_quantized needs a format to heal in: set compression.weights (--weights nf4)")
        if self.teacher_weights not in weight_choices():
            raise ValueError(f"teacher_weights must be one of {list(weight_choices())}, got {self.teacher_weights!r}")
        if self.save_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"save_dtype must be one of ['float32', 'bfloat16', 'float16'], got {self.save_dtype!r}")


@dataclass
class HealResult:
    """What `compress_model` did: the saved folder, the recorded config, metrics before and after healing."""

    out: Path
    config: SlimConfig
    trainable_params: int
    metrics_before: dict[str, float]
    metrics_after: dict[str, float]
    history: list[dict]
    model: nn.Module


def compress_model(config: HealConfig, train: TrainConfig | None = None, *, progress: bool = True) -> HealResult:
    """Compress `config.model`, heal it for `config.heal_steps` steps, quantize it if asked, and save it."""
    if config.out.exists() and not config.overwrite:
        raise FileExistsError(f"{config.out} already exists: choose another --out or pass --overwrite")
    path = models.resolve(config.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    hf_config = AutoConfig.from_pretrained(path)
    if config.teacher_weights != "none" and compat.detect_objective(hf_config)[0] != "causal":
        raise ValueError(
            f"teacher_weights={config.teacher_weights!r} quantizes causal LMs only, and {path} is an encoder: use --teacher-weights none"
        )
    student = compat.auto_class(hf_config).from_pretrained(path, dtype=torch.float32)
    compressed = compress_(
        student, dataclasses.replace(config.compression, weights=None, embedding_weights=None, double_quant=None), tokenizer=tokenizer
    )
    if config.heal_quantized:
        _quantize(student, dataclasses.replace(config.compression, embedding_rank=compressed.embedding_rank, embedding_energy=None))
    n_trainable = mark_trainable_(student, config.train_all)
    before, after, history = {}, {}, []
    if config.heal_steps:
        train = dataclasses.replace(train or TrainConfig(), steps=config.heal_steps)
        before, after, history, student = _heal(student, path, tokenizer, config, train, progress)
    final = dataclasses.replace(config.compression, embedding_rank=compressed.embedding_rank, embedding_energy=None)
    student = _finalize(student, final, config.save_dtype)
    _save(student, tokenizer, config.out, config.overwrite)
    return HealResult(config.out, final, n_trainable, before, after, history, student)


def mark_trainable_(model: nn.Module, train_all: bool = False) -> int:
    """Let only the compressed parts (embedding factors, shared blocks' float weights) train; the count of trainable parameters."""
    model.requires_grad_(False)
    for param in _compressed_parameters(model) if not train_all else model.parameters():
        if param.is_floating_point():
            param.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _compressed_parameters(model: nn.Module) -> list[nn.Parameter]:
    params = [p for m in model.modules() if isinstance(m, FactorizedEmbedding) for p in m.parameters()]
    leaf_paths: dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        leaf_paths[id(module)] = leaf_paths.get(id(module), 0) + 1
    shared = [m for m in model.modules() if leaf_paths[id(m)] > 1 and not isinstance(m, FactorizedEmbedding)]
    return params + [p for m in shared for p in m.parameters(recurse=False)]


def _heal(student, path: Path, tokenizer, config: HealConfig, train: TrainConfig, progress: bool):
    from llmslim.distill.evaluate import make_eval_fn
    from llmslim.distill.losses import DistillLoss, LossWeights
    from llmslim.train.data import load_splits, prepare_data
    from llmslim.train.loop import Trainer, make_accelerator

    causal = compat.detect_objective(student.config)[0] == "causal"
    data = prepare_data(tokenizer, load_splits(config.train, None, 0.1, "text"), config.block_size, encoder=not causal)
    accelerator = make_accelerator(train)
    teacher = _teacher(path, config.teacher_weights, accelerator.device)
    if causal:
        eval_fn = make_eval_fn("causal", True, data, config.eval_tokens, teacher, None)
        weights = LossWeights(config.alpha_kd, config.alpha_lm, config.alpha_cos, config.temperature)
    else:  # an encoder heals on its hidden states alone and is scored by pooled-embedding cosine
        eval_fn = make_eval_fn("masked", False, data, config.eval_tokens, teacher, None)
        weights = LossWeights(0.0, 0.0, config.alpha_cos or 1.0, config.temperature)
    trainer = Trainer(
        student,
        train,
        data.train,
        DistillLoss(teacher, weights, [(-1, -1)], None),
        eval_fn=eval_fn,
        fingerprint={"heal": str(path), **{k: str(v) for k, v in config.compression.to_dict().items()}},
        accelerator=accelerator,
        progress=progress,
    )
    student.eval()
    with torch.no_grad():
        before = eval_fn(student)
    result = trainer.fit()
    return before, result.final_eval, result.history, trainer.unwrapped_model()


def _teacher(path: Path, weights: str, device: torch.device) -> nn.Module:
    if weights == "none":
        teacher = compat.auto_class(AutoConfig.from_pretrained(path)).from_pretrained(path)
    else:
        import llmslim

        teacher = llmslim.from_pretrained(path, SlimConfig(weights=weights), device_map=str(device), progress=False)
    return teacher.to(device).eval().requires_grad_(False)


def _finalize(student: nn.Module, config: SlimConfig, save_dtype: str) -> nn.Module:
    """Cast, quantize if `config.weights` (shared blocks stay shared), record `config` on the model."""
    student = _cast_float_(student, getattr(torch, save_dtype), config.torch_compute_dtype).eval().requires_grad_(False)
    if config.embedding_weights is not None:
        student.get_input_embeddings().quantize_table_(table_config(config))
    if config.weights is not None:
        _quantize(student, config)  # a no-op for layers quantized before healing
    compat.mark_quantized(student, config)
    return student


def _cast_float_(model: nn.Module, dtype: torch.dtype, compute_dtype: torch.dtype | None) -> nn.Module:
    """Cast the float parameters and buffers to `dtype`, leaving quantized layers' state (absmax, scales) as their format stores it."""
    from llmslim.quant.modules import SlimLinear

    layers = [m for m in model.modules() if isinstance(m, SlimLinear)]
    quantized = {id(t) for m in layers for t in [*m.parameters(), *m.buffers()]}
    for layer in layers:
        layer.compute_dtype = compute_dtype or dtype  # as when loaded in `dtype`
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for tensor in store.values():
                if tensor is not None and tensor.is_floating_point() and id(tensor) not in quantized:
                    tensor.data = tensor.data.to(dtype)
    return model


def _quantize(student: nn.Module, config: SlimConfig) -> None:
    """Quantize the student's linear layers to `config.weights`; shared blocks stay shared."""
    from llmslim.compress.load import share_loaded_
    from llmslim.quant.quantize import quantize_

    quantize_(student, config)
    if config.share_layers is not None:
        share_loaded_(student, config)  # quantize_ replaced each shared module under its first name only


def _save(model: nn.Module, tokenizer, out: Path, overwrite: bool) -> None:
    from llmslim.save import save_pretrained

    save_pretrained(model, out, overwrite=overwrite, tokenizer=tokenizer)
