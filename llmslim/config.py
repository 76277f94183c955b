"""`SlimConfig`: the one configuration object of llmslim, validated at construction.

It is a transformers quantization config (`quant_method = "llmslim"`), so it travels inside a
model's `config.json` and `from_pretrained` finds llmslim's quantizer from it.
"""

from __future__ import annotations

import fnmatch
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from transformers.utils.quantization_config import QuantizationConfigMixin

from llmslim.quant.registry import FORMATS, FOUR_BIT, LayerSpec

QUANT_METHOD = "llmslim"
CONFIG_VERSION = 1

WEIGHT_FORMATS = (None, *FORMATS)  # None keeps the float weights; the formats are `quant.registry.FORMATS`
COMPUTE_DTYPES = (None, "float32", "bfloat16", "float16")
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
DEFAULT_EXCLUDE = ("lm_head",)
DECODE_HEADS = ("int8", "float")
METHODS = ("rtn", "gptq")  # how codes are chosen: round-to-nearest, or GPTQ on calibration text (llmslim.calibrate)
CHECKPOINTING = ("none", "all", "sqrt")  # or a number of segments k >= 1 (llmslim.memory.checkpointing)


def _check_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _is_int(value: Any) -> bool:
    """An integer, not a bool (JSON's `true` is not a count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
    """A finite int or float, not a bool; an int too large for a float (JSON allows any) is not finite here."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _check_patterns(name: str, value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) and p for p in value):
        raise ValueError(f"{name} must be a list of module-name patterns such as ['q_proj', 'layers.*.mlp.*'], got {value!r}")
    return list(value)


@dataclass(repr=False)
class SlimConfig(QuantizationConfigMixin):
    """How llmslim compresses a model.

    Args:
        weights: weight format of the selected linear layers and mixture-of-experts expert weights
            (per expert): `None` (keep), `"int8"` (LLM.int8 row-wise absmax), `"nf4"` or `"fp4"`
            (blockwise 4-bit, bitsandbytes layout), `"int4"` (llmslim's groupwise asymmetric int4:
            float16 scale and zero per group of a row; no bitsandbytes equivalent).
        compute_dtype: dtype of the matmuls (`"bfloat16"`, `"float16"`, `"float32"`); `None` uses
            the dtype the model is loaded in.
        block_size: elements per absmax block for NF4/FP4, per group for int4.
        double_quant: quantize the 4-bit absmax again to 8 bits (QLoRA); `None` means on for 4-bit.
        int8_threshold: LLM.int8 outlier threshold: activation columns with |x| above it are
            computed in 16 bits, the rest in int8 (CUDA always; CPU for prompts, where int8 GEMM
            pays). 0 disables the decomposition. The paper's 6.0 targets the large emergent
            outliers of 6.7B+ models; 1.5 keeps small models within 0.3% of bf16 perplexity
            (SmolLM2-135M: +0.17% at 1.5, +1.6% at 6.0; ~17% of columns become outliers).
        refine: int4 only: refine each group's scale and zero (HQQ zero-point optimisation, then a
            least-squares refit) instead of plain min/max. Lower error, slower quantization.
        method: how the codes are chosen: `"rtn"` (round to nearest) or `"gptq"` (GPTQ on
            calibration text, block by block, into the same stored format: `llmslim.calibrate`).
            Recorded in saved models; a saved GPTQ model reloads without calibrating.
        damp: GPTQ: dampening of the input Hessian, a share of its mean diagonal (default 0.25:
            calibration text is rarely the text a model then reads, and a strong dampening keeps
            GPTQ from fitting the calibration text's statistics; see docs/quantization.md).
        act_order: GPTQ: quantize the input columns in order of decreasing Hessian diagonal
            (default True; the stored format and its groups do not change).
        balance: GPTQ: before quantizing, rescale the input channels of the layers that read one
            input (AWQ-style, `s = rms(x)^alpha`, alpha searched on the calibration Hessian) and fold
            the inverse scales into what produces that input (a norm's weight, a gated MLP's up
            projection): the float model computes the same, its quantization loses less. Default True.
        bits_per_param: 4-bit formats (int4, nf4, fp4): a budget in bits per parameter (every
            scale, zero and absmax counted) for a mixed 4-bit/int8 model: the layers whose 4-bit
            reconstruction error is largest are kept in int8 while the quantized layers' average
            stays within the budget. Chosen from the weights alone (no data) when the model is
            loaded, then recorded in `int8_layers`. `None`: every selected layer in 4 bits.
        int8_layers: 4-bit formats (int4, nf4, fp4): full names of the layers stored in int8
            instead, saved with the model so that it reloads identically. Filled in from
            `bits_per_param`; or by hand, e.g. `exclude=[], int8_layers=["lm_head"]` for
            an int8 output head (its GEMV then reads half the bytes of bf16 at every decoded token).
        decode_head: `"int8"` (default): on CPU, an output head left in 16 bits (or float32) decodes
            through a row-wise int8 copy of itself, built at the first decoded token and kept beside
            the float weight (V x H bytes more; prompts, training and saving use the float weight):
            the head is a decode step's largest read (measured: SmolLM2 nf4 decodes 1.08x faster, the 1.1B
            shape 1.07x, at +0.09% perplexity); `"float"` keeps the float head (`llmslim.quant.head`).
        include: module-name patterns (fnmatch, matched against the full name or its suffix) of
            the layers to quantize; `None` selects every linear layer.
        exclude: patterns of layers never quantized; `lm_head` by default.
        embedding_rank: factorize the input embedding (V x H) into a V x E table and an E x H
            projection of rank E (ALBERT); E must be below min(V, H). A tied output head computes
            its logits through the same factors (`llmslim.compress`).
        embedding_energy: choose the smallest rank keeping this share (0..1) of the table's
            (frequency-weighted) energy instead of giving `embedding_rank`; the chosen rank is
            recorded in `embedding_rank` once the model is loaded.
        embedding_corpus: a UTF-8 text file whose token frequencies weight the SVD (frequent
            tokens reconstructed best); `None` for plain truncated SVD.
        embedding_weights: format of the V x E table (`"int8"`, `"nf4"`, `"fp4"`, `"int4"`), or
            `None` to keep it in float.
        untie_embeddings: with a tied head, keep the head's full V x H weight (only the input
            embedding is factorized): larger, much better perplexity before healing.
        share_layers: cross-layer sharing of the decoder blocks: `"all"` (ALBERT), an integer k
            (consecutive groups of k), or explicit groups such as `[[0, 1], [2, 3, 4]]`.
        share_init: what a shared group starts from: `"mean"` of its blocks, or the index of a
            member within the group (0 is the first).
        share_norms: also share the norm layers (by default each layer keeps its own norms).
        checkpointing: activation checkpointing set on the loaded model (`llmslim.enable_checkpointing`):
            `"none"`, `"all"` (every block), `"sqrt"` (~sqrt(n) segments) or a number of segments k.
        allow_nonfinite: quantize float weights holding NaN or infinite values instead of refusing
            them. Off by default: such values do not survive quantization (a NaN is dropped or kept
            depending on the format, an Inf turns its block, and with double quantization the whole
            weight, into NaN), so a corrupt checkpoint raises a ValueError naming the layer.
        version: version of this config's schema.
    """

    weights: str | None = "nf4"
    compute_dtype: str | None = None
    block_size: int = 64
    double_quant: bool | None = None
    int8_threshold: float = 1.5
    refine: bool = False
    method: str = "rtn"
    damp: float = 0.25
    act_order: bool = True
    balance: bool = True
    bits_per_param: float | None = None
    int8_layers: list[str] | None = None
    decode_head: str = "int8"
    include: list[str] | None = None
    exclude: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDE))
    embedding_rank: int | None = None
    embedding_energy: float | None = None
    embedding_corpus: str | None = None
    embedding_weights: str | None = None
    untie_embeddings: bool = False
    share_layers: int | str | list[list[int]] | None = None
    share_init: str | int = "mean"
    share_norms: bool = False
    checkpointing: str | int = "none"
    allow_nonfinite: bool = False
    version: int = CONFIG_VERSION
    quant_method: str = QUANT_METHOD

    def __post_init__(self) -> None:
        _check_choice("weights", self.weights, WEIGHT_FORMATS)
        if isinstance(self.compute_dtype, torch.dtype):
            self.compute_dtype = str(self.compute_dtype).removeprefix("torch.")
        _check_choice("compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int):
            raise ValueError(f"block_size must be one of {list(BLOCK_SIZES)}, got {self.block_size!r}")
        _check_choice("block_size", self.block_size, BLOCK_SIZES)
        if self.double_quant is None:
            self.double_quant = self.is_4bit
        if not isinstance(self.double_quant, bool):
            raise ValueError(f"double_quant must be True, False or None, got {self.double_quant!r}")
        if self.double_quant and not self.is_4bit:
            raise ValueError(f"double_quant applies to nf4/fp4 absmax blocks, not to weights={self.weights!r}: leave it None")
        if not _is_finite_number(self.int8_threshold) or self.int8_threshold < 0:
            raise ValueError(
                f"int8_threshold must be a finite number >= 0 (default 1.5; 6.0 is the LLM.int8 paper's), got {self.int8_threshold!r}"
            )
        self.int8_threshold = float(self.int8_threshold)
        if not isinstance(self.refine, bool):
            raise ValueError(f"refine must be True or False, got {self.refine!r}")
        self._check_method()
        self.include = _check_patterns("include", self.include)
        self.exclude = _check_patterns("exclude", self.exclude) or []
        self._check_mixed()
        _check_choice("decode_head", self.decode_head, DECODE_HEADS)
        self._check_embedding()
        self._check_sharing()
        if not (
            (isinstance(self.checkpointing, str) and self.checkpointing in CHECKPOINTING)
            or (_is_int(self.checkpointing) and self.checkpointing >= 1)
        ):
            raise ValueError(f"checkpointing must be one of {list(CHECKPOINTING)} or a number of segments >= 1, got {self.checkpointing!r}")
        if not isinstance(self.allow_nonfinite, bool):
            raise ValueError(f"allow_nonfinite must be True or False, got {self.allow_nonfinite!r}")
        if not _is_int(self.version) or self.version != CONFIG_VERSION:
            raise ValueError(f"version must be {CONFIG_VERSION} (this llmslim's config schema), got {self.version!r}")
        if self.quant_method != QUANT_METHOD:
            raise ValueError(f"quant_method must be {QUANT_METHOD!r}, got {self.quant_method!r}")

    def _check_method(self) -> None:
        _check_choice("method", self.method, METHODS)
        if self.method == "gptq" and self.weights is None:
            raise ValueError("method='gptq' chooses the codes of quantized weights: set weights to int8, nf4, fp4 or int4")
        if not _is_finite_number(self.damp) or not 0 < self.damp < 1:
            raise ValueError(f"damp must be a number in (0, 1) (a share of the Hessian's mean diagonal; default 0.25), got {self.damp!r}")
        self.damp = float(self.damp)
        for name in ("act_order", "balance"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    def _check_mixed(self) -> None:
        if self.bits_per_param is not None:
            if not _is_finite_number(self.bits_per_param):
                raise ValueError(f"bits_per_param must be a number of bits such as 5.0, got {self.bits_per_param!r}")
            if self.weights not in FOUR_BIT:
                raise ValueError(
                    f"bits_per_param mixes 4-bit and int8 layers: use weights in {list(FOUR_BIT)}, got weights={self.weights!r}"
                )
            if not 4.0 < self.bits_per_param <= 9.0:
                raise ValueError(f"bits_per_param must be above 4 (4-bit) and at most 9 (all int8), got {self.bits_per_param!r}")
            self.bits_per_param = float(self.bits_per_param)
        if self.int8_layers is not None:
            if self.weights not in FOUR_BIT:
                raise ValueError(
                    f"int8_layers keeps some layers of a 4-bit model in int8 (weights in {list(FOUR_BIT)}), got weights={self.weights!r}"
                )
            if not isinstance(self.int8_layers, (list, tuple)) or not all(isinstance(n, str) and n for n in self.int8_layers):
                raise ValueError(
                    f"int8_layers must be a list of module names such as ['model.layers.0.mlp.down_proj'], got {self.int8_layers!r}"
                )
            self.int8_layers = sorted(self.int8_layers)
            unselected = [name for name in self.int8_layers if not self.selects(name)]
            if unselected:
                raise ValueError(
                    f"int8_layers names {unselected}, which include/exclude leave in float (exclude={self.exclude}): "
                    "take them out of exclude, e.g. exclude=[] for an int8 lm_head"
                )

    def _check_embedding(self) -> None:
        if self.embedding_rank is not None and (not _is_int(self.embedding_rank) or self.embedding_rank < 1):
            raise ValueError(
                f"embedding_rank must be a positive integer such as 256 (below min(vocab, hidden)), got {self.embedding_rank!r}"
            )
        if self.embedding_energy is not None:
            if not _is_finite_number(self.embedding_energy) or not 0 < self.embedding_energy < 1:
                raise ValueError(f"embedding_energy must be a share in (0, 1) such as 0.9, got {self.embedding_energy!r}")
            if self.embedding_rank is not None:
                raise ValueError(f"give embedding_rank ({self.embedding_rank!r}) or embedding_energy ({self.embedding_energy!r}), not both")
            self.embedding_energy = float(self.embedding_energy)
        if self.embedding_corpus is not None:
            if not isinstance(self.embedding_corpus, (str, os.PathLike)) or not str(self.embedding_corpus):
                raise ValueError(f"embedding_corpus must be the path of a UTF-8 text file, got {self.embedding_corpus!r}")
            self.embedding_corpus = str(self.embedding_corpus)
        _check_choice("embedding_weights", self.embedding_weights, WEIGHT_FORMATS)
        if not isinstance(self.untie_embeddings, bool):
            raise ValueError(f"untie_embeddings must be True or False, got {self.untie_embeddings!r}")
        asked = [n for n in ("embedding_corpus", "embedding_weights") if getattr(self, n) is not None] + (
            ["untie_embeddings"] if self.untie_embeddings else []
        )
        if asked and not self.factorizes_embedding:
            raise ValueError(f"{asked[0]} applies to a factorized embedding: also set embedding_rank (e.g. 256) or embedding_energy")

    def _check_sharing(self) -> None:
        spec = self.share_layers
        if isinstance(spec, tuple):
            spec = self.share_layers = [list(g) for g in spec]
        ok = spec is None or spec == "all" or (_is_int(spec) and spec >= 2)
        ok = ok or (
            isinstance(spec, list)
            and bool(spec)
            and all(isinstance(g, (list, tuple)) and g and all(_is_int(i) and i >= 0 for i in g) for g in spec)
        )
        if not ok:
            raise ValueError(
                f"share_layers must be 'all', a group size k >= 2, or groups of layer indices such as [[0, 1], [2, 3]], got {spec!r}"
            )
        if isinstance(spec, list):
            self.share_layers = [list(g) for g in spec]
        init = self.share_init
        if not (init == "mean" or (_is_int(init) and init >= 0)):
            raise ValueError(f"share_init must be 'mean' or the index of a group member (0 is the first), got {init!r}")
        if not isinstance(self.share_norms, bool):
            raise ValueError(f"share_norms must be True or False, got {self.share_norms!r}")

    @property
    def factorizes_embedding(self) -> bool:
        """The input embedding is factorized (rank given or chosen from an energy budget)."""
        return self.embedding_rank is not None or self.embedding_energy is not None

    @property
    def compresses(self) -> bool:
        """Embedding factorization or layer sharing is asked for (`llmslim.compress`)."""
        return self.factorizes_embedding or self.share_layers is not None

    @property
    def needs_mixed_choice(self) -> bool:
        """A bits budget whose int8 layers have not been chosen yet (they are, at load time)."""
        return self.bits_per_param is not None and self.int8_layers is None

    def format_for(self, module_name: str) -> str | None:
        """The weight format of the layer called `module_name` (int8 for mixed-mode's chosen layers)."""
        if self.int8_layers and module_name in self.int8_layers:
            return "int8"
        return self.weights

    def layer_spec(self, module_name: str = "", weights: str | None = None) -> LayerSpec:
        """What the quantized layer called `module_name` needs of this config (its format per
        `format_for`, or `weights` when given; used for layers outside the selection too, such
        as a factorized embedding's table)."""
        return LayerSpec(
            fmt=weights or self.format_for(module_name),
            block_size=self.block_size,
            double_quant=bool(self.double_quant),
            int8_threshold=self.int8_threshold,
            refine=self.refine,
            compute_dtype=self.torch_compute_dtype,
            allow_nonfinite=self.allow_nonfinite,
        )

    @property
    def is_4bit(self) -> bool:
        """NF4/FP4: the bitsandbytes 4-bit formats (absmax blocks, double quantization)."""
        return self.weights is not None and FORMATS[self.weights].blockwise_absmax

    @property
    def torch_compute_dtype(self) -> torch.dtype | None:
        return None if self.compute_dtype is None else getattr(torch, self.compute_dtype)

    def selects(self, module_name: str) -> bool:
        """Whether the module called `module_name` is chosen by include / exclude."""
        if _matches(module_name, self.exclude):
            return False
        return self.include is None or _matches(module_name, self.include)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs):
        """A config from `to_dict`'s output (a model's `config.json`); unknown fields raise a ValueError naming them."""
        if not isinstance(config_dict, dict):
            raise ValueError(f"a SlimConfig dict must be a JSON object of its fields, got {config_dict!r}")
        unknown = sorted(str(k) for k in set(config_dict) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(
                f"unknown SlimConfig field(s) {unknown}: valid fields are {[f.name for f in fields(cls)]} "
                "(a config written by a newer llmslim? upgrade llmslim)"
            )
        return super().from_dict(config_dict, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": self.quant_method,
            "version": self.version,
            "weights": self.weights,
            "compute_dtype": self.compute_dtype,
            "block_size": self.block_size,
            "double_quant": self.double_quant,
            "int8_threshold": self.int8_threshold,
            "refine": self.refine,
            "method": self.method,
            "damp": self.damp,
            "act_order": self.act_order,
            "balance": self.balance,
            "bits_per_param": self.bits_per_param,
            "int8_layers": self.int8_layers,
            "decode_head": self.decode_head,
            "include": self.include,
            "exclude": list(self.exclude),
            "embedding_rank": self.embedding_rank,
            "embedding_energy": self.embedding_energy,
            "embedding_corpus": self.embedding_corpus,
            "embedding_weights": self.embedding_weights,
            "untie_embeddings": self.untie_embeddings,
            "share_layers": self.share_layers,
            "share_init": self.share_init,
            "share_norms": self.share_norms,
            "checkpointing": self.checkpointing,
            "allow_nonfinite": self.allow_nonfinite,
        }

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items() if k != "quant_method")
        return f"SlimConfig({fields})"


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, f"*.{p}") for p in patterns)
