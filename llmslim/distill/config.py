"""DistillConfig: what to distill into what, and with which loss, validated at construction."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from llmslim.quant.registry import weight_choices

TEACHER_WEIGHTS = weight_choices()  # "none" (float) or any registered format
OBJECTIVES = ("auto", "causal", "masked")
COS_LAYERS = ("last", "mapped")
SAVE_DTYPES = ("float32", "bfloat16", "float16")
DIVERGENCES = ("forward", "reverse")
TEACHER_OFFLOAD = ("cpu", "disk")
# recipe -> (alpha_kd, alpha_lm, alpha_cos, temperature): the values a field left at None takes
RECIPES = {
    # forward KL at T=1 mixed with cross-entropy, half on each: best of bench_distill's sweep at 400 steps (0.75 and 0.5
    # tie at 60; docs/distillation.md)
    "kd": (0.5, 0.5, 0.0, 1.0),
    "distilbert": (5.0, 2.0, 1.0, 2.0),  # DistilBERT's triple loss
}


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
        recipe: `"kd"` (default: KL at T=1 with `kd_ratio` 0.5 of the weight, no cosine) or `"distilbert"` (KL at
            T=2 weighted 5, LM 2, hidden cosine 1); it fills the loss fields left at None.
        divergence: `"forward"` KL(teacher || student) (default) or `"reverse"` KL(student || teacher).
        kd_ratio: share of the KL in a KL + cross-entropy mix: alpha_kd = r, alpha_lm = 1 - r.
        kd_ratio_end: the KL's share of alpha_kd + alpha_lm at the last step; the share moves linearly from
            alpha_kd / (alpha_kd + alpha_lm) at the first step (a KD-to-LM handover when lower). None: constant.
        alpha_kd / alpha_lm / alpha_cos: weights of the soft-target KL, language-modelling and
            hidden-state cosine losses (None: the recipe's; alpha_cos is 1 when alpha_kd and alpha_lm are both 0).
        temperature: softmax temperature of the soft targets (None: the recipe's).
        teacher_cache: folder of a teacher cache (`llmslim.distill.cache`): built once (the teacher runs over the
            training blocks, then is freed), then read instead of running the teacher.
        cache_k: logits kept per position in the teacher cache (the rest are kept as one log-sum-exp).
        teacher_offload: `"cpu"` or `"disk"`: the teacher's blocks stay quantized in RAM or on disk and stream to the
            compute device (`llmslim.from_pretrained(offload=...)`), for a teacher larger than memory.
        teacher_offload_budget: with `teacher_offload`: bytes (or a size such as `"300MiB"`) of the teacher's weights
            kept on the compute device; the other blocks stream (default: 80% of the free memory).
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
    recipe: str = "kd"
    divergence: str = "forward"
    kd_ratio: float | None = None
    kd_ratio_end: float | None = None
    alpha_kd: float | None = None
    alpha_lm: float | None = None
    alpha_cos: float | None = None
    temperature: float | None = None
    teacher_cache: str | Path | None = None
    cache_k: int = 64
    teacher_offload: str | None = None
    teacher_offload_budget: int | str | None = None
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
        _check_choice("recipe", self.recipe, tuple(RECIPES))
        _check_choice("divergence", self.divergence, DIVERGENCES)
        if self.teacher_offload is not None:
            _check_choice("teacher_offload", self.teacher_offload, TEACHER_OFFLOAD)
        if self.teacher_offload_budget is not None and self.teacher_offload is None:
            raise ValueError(
                f"teacher_offload_budget={self.teacher_offload_budget!r} needs teacher_offload: add --teacher-offload disk (or cpu)"
            )
        self._resolve_loss_weights()
        if self.teacher_cache is not None:
            self.teacher_cache = Path(self.teacher_cache).expanduser()
        if not isinstance(self.cache_k, int) or isinstance(self.cache_k, bool) or self.cache_k < 1:
            raise ValueError(f"cache_k must be a positive integer, got {self.cache_k!r}")
        for name in ("alpha_kd", "alpha_lm", "alpha_cos"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.alpha_kd + self.alpha_lm + self.alpha_cos == 0:
            raise ValueError("alpha_kd, alpha_lm and alpha_cos are all 0: give at least one loss a positive weight")
        if self.kd_ratio_end is not None:
            if not 0 <= self.kd_ratio_end <= 1:
                raise ValueError(f"kd_ratio_end must be in [0, 1], got {self.kd_ratio_end!r}")
            if self.alpha_kd + self.alpha_lm == 0:
                raise ValueError(
                    f"kd_ratio_end={self.kd_ratio_end!r} shares alpha_kd + alpha_lm between the KL and LM losses, but both are 0: "
                    "give --kd-ratio (the share at the first step) or drop --kd-ratio-end"
                )
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

    def _resolve_loss_weights(self) -> None:
        """Fill the loss fields left at None from `kd_ratio` and the recipe."""
        if self.kd_ratio is not None:
            if not 0 <= self.kd_ratio <= 1:
                raise ValueError(f"kd_ratio must be in [0, 1], got {self.kd_ratio!r}")
            if self.alpha_kd is not None or self.alpha_lm is not None:
                raise ValueError("give kd_ratio or alpha_kd / alpha_lm, not both (kd_ratio r means alpha_kd = r, alpha_lm = 1 - r)")
            self.alpha_kd, self.alpha_lm = float(self.kd_ratio), 1.0 - self.kd_ratio
        if self.alpha_cos is None and self.alpha_kd == 0 and self.alpha_lm == 0:
            self.alpha_cos = 1.0  # no logits to learn from (a bare encoder): align the hidden states
        for name, value in zip(("alpha_kd", "alpha_lm", "alpha_cos", "temperature"), RECIPES[self.recipe], strict=True):
            if getattr(self, name) is None:
                setattr(self, name, value)

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
        for name in ("out", "overwrite", "eval_tokens", "save_dtype", "teacher_offload", "teacher_offload_budget", "recipe", "kd_ratio"):
            values.pop(name)  # where things live, or names of values that are in the fingerprint themselves
        if self.kd_ratio_end is None:
            values.pop("kd_ratio_end")  # a constant mix: as checkpoints written before the option existed
        values["teacher_cache"] = self.teacher_cache is not None  # cached top-k logits or the teacher's full ones
        return values


def _check_choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
