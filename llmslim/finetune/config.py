"""FinetuneConfig: base model, its quantization, the LoRA adapters and the data of `llmslim finetune`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from llmslim.quant.registry import weight_choices

BASE_WEIGHTS = weight_choices()  # "none" (float) or any registered format


@dataclass
class FinetuneConfig:
    """Options of `finetune()` (the training loop's own options are a `TrainConfig`).

    Args:
        out: folder for the adapter (peft's format: adapter_config.json, adapter_model.safetensors).
        base: base model folder or .gguf; None is the embedded SmolLM2-135M-Instruct.
        weights: format of the frozen base's adapted layers (`"none"` keeps them in float).
        block_size_quant: absmax block / group size of the base's quantization.
        dtype: dtype of the base's float parts and matmuls (None: the checkpoint's).
        rank: LoRA rank r.
        alpha: LoRA alpha (the update is scaled by alpha / r).
        dropout: dropout on the LoRA input.
        targets: name patterns (fnmatch, on the name or its suffix) of the adapted linear layers;
            None adapts every linear layer but `exclude`.
        exclude: patterns never adapted nor quantized (the output layer).
        train / eval / eval_fraction / text_field / block_size / eval_tokens: the data, as for distillation.
        overwrite: replace `out` if it exists.
    """

    out: Path
    base: str | None = None
    weights: str = "nf4"
    block_size_quant: int = 64
    dtype: str | None = None
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: list[str] | None = None
    exclude: list[str] = field(default_factory=lambda: ["lm_head"])
    train: str | Path = ""
    eval: str | Path | None = None
    eval_fraction: float = 0.1
    text_field: str = "text"
    block_size: int = 256
    eval_tokens: int = 20_000
    overwrite: bool = False

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.weights not in BASE_WEIGHTS:
            raise ValueError(f"weights must be one of {list(BASE_WEIGHTS)}, got {self.weights!r}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be a positive integer (LoRA r, e.g. 8 or 16), got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0 (LoRA scaling is alpha / rank), got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.targets is not None and (not self.targets or not all(isinstance(t, str) and t for t in self.targets)):
            raise ValueError(
                "targets must be None (every linear layer) or a non-empty list of name patterns "
                f"such as ['q_proj', 'v_proj'], got {self.targets!r}"
            )
        if isinstance(self.eval_tokens, bool) or not isinstance(self.eval_tokens, int) or self.eval_tokens < 2:
            raise ValueError(f"eval_tokens must be an integer >= 2, got {self.eval_tokens!r}")

    def fingerprint(self) -> dict:
        """The values a resumed run must share with its checkpoint."""
        values = asdict(self)
        keep = ("base", "weights", "block_size_quant", "dtype", "rank", "alpha", "dropout", "targets", "exclude", "train", "eval")
        return {name: values[name] for name in keep} | {"eval_fraction": self.eval_fraction, "block_size": self.block_size}
