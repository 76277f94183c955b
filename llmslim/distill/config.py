"""DistillConfig: what to distill into what, and with which loss, validated at construction."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from llmslim.quant.registry import weight_choices

TEACHER_WEIGHTS = weight_choices()  # "none" (float) or any registered format
OBJECTIVES = ("auto", "causal", "masked")
COS_LAYERS = ("last", "mapped")
SAVE_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class DistillConfig:
    """A distillation run (the loop's own options are a `TrainConfig`).

    Args:
        out: folder the student is saved to (a standard Hugging Face folder with the tokenizer).
        teacher: local Hugging Face folder or .gguf file; None is the embedded default model.
        student_layers: student depth, layers spread DistilBERT-style over the teacher's
            (12 -> 6 takes [0, 2, 4, 7, 9, 11]); None with no map means half the teacher's.
        student_layer_map: explicit teacher layer index for each student layer.
        student: start from this model folder instead of copying teacher layers.
        student_embedding_rank: factorize the student's embedding at this rank (`llmslim.compress`).
        student_share_layers: share the student's blocks: `"all"`, a group size k, or explicit groups.
        save_dtype: dtype of the saved student (`"float32"`, the dtype it trains in, `"bfloat16"`, `"float16"`).
        teacher_weights: `"none"` (float) or a format of `llmslim.quant.registry.FORMATS`, applied through llmslim (causal LMs).
        teacher_dtype: dtype of the float teacher (default: the checkpoint's).
        objective: `"causal"`, `"masked"` (BERT-style, 15% masking 80/10/10) or `"auto"` (from the
            teacher's architecture).
        alpha_kd / alpha_lm / alpha_cos: weights of the soft-target KL, language-modelling and
            hidden-state cosine losses (DistilBERT: 5, 2, 1).
        temperature: softmax temperature of the soft targets (DistilBERT: 2).
        cos_layers: `"last"` aligns the last hidden states; `"mapped"` every student layer with
            the teacher layer it was copied from.
        mlm_probability: share of tokens chosen by masked-LM masking.
        train / eval / eval_fraction / text_field: data sources (see `llmslim.train.data`).
        block_size: tokens per training block.
        eval_tokens: held-out tokens scored per evaluation.
        overwrite: replace `out` if it exists.
    """

    out: Path
    teacher: str | Path | None = None
    student_layers: int | None = None
    student_layer_map: list[int] | None = None
    student: str | Path | None = None
    student_embedding_rank: int | None = None
    student_share_layers: int | str | list[list[int]] | None = None
    save_dtype: str = "float32"
    teacher_weights: str = "none"
    teacher_dtype: str | None = None
    objective: str = "auto"
    alpha_kd: float = 5.0
    alpha_lm: float = 2.0
    alpha_cos: float = 1.0
    temperature: float = 2.0
    cos_layers: str = "last"
    mlm_probability: float = 0.15
    train: str | Path = ""
    eval: str | Path | None = None
    eval_fraction: float = 0.1
    text_field: str = "text"
    block_size: int = 256
    eval_tokens: int = 20_000
    overwrite: bool = False

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        _check_choice("teacher_weights", self.teacher_weights, TEACHER_WEIGHTS)
        _check_choice("objective", self.objective, OBJECTIVES)
        _check_choice("cos_layers", self.cos_layers, COS_LAYERS)
        _check_choice("save_dtype", self.save_dtype, SAVE_DTYPES)
        for name in ("alpha_kd", "alpha_lm", "alpha_cos"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.alpha_kd + self.alpha_lm + self.alpha_cos == 0:
            raise ValueError("alpha_kd, alpha_lm and alpha_cos are all 0: give at least one loss a positive weight")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if not 0 < self.mlm_probability < 1:
            raise ValueError(f"mlm_probability must be in (0, 1), got {self.mlm_probability!r}")
        if not str(self.train):
            raise ValueError("train must name the training data: a text file, a .jsonl file or a saved dataset folder")
        if self.eval_tokens < 2:
            raise ValueError(f"eval_tokens must be at least 2, got {self.eval_tokens!r}")
        self._check_student_choice()
        if self.student_embedding_rank is not None or self.student_share_layers is not None:
            self.student_compression()  # validates both values

    def student_compression(self):
        """The SlimConfig compressing the student (`None` when neither option is given)."""
        if self.student_embedding_rank is None and self.student_share_layers is None:
            return None
        from llmslim.config import SlimConfig

        return SlimConfig(weights=None, embedding_rank=self.student_embedding_rank, share_layers=self.student_share_layers)

    def _check_student_choice(self) -> None:
        given = [n for n in ("student_layers", "student_layer_map", "student") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of student_layers, student_layer_map and student, got {given}")
        if self.student_layers is not None and (not isinstance(self.student_layers, int) or self.student_layers < 1):
            raise ValueError(f"student_layers must be a positive integer, got {self.student_layers!r}")
        if self.student_layer_map is not None and len(self.student_layer_map) == 0:
            raise ValueError("student_layer_map is empty: give at least one teacher layer index, e.g. 0,2,4")

    def fingerprint(self) -> dict:
        """The values a resumed run must share with its checkpoint."""
        values = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}
        for name in ("out", "overwrite", "eval_tokens", "save_dtype"):
            values.pop(name)
        return values


def _check_choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
