"""Quantized linear modules, and the function that puts them into a model.

Each module is built from the float layer it replaces with `from_linear` (on the meta device when
loading, so no float weight is ever allocated) and filled later with `set_float_weight` (quantize
now) or by loading its state dict (already quantized). Its state dict is the on-disk format:

- `SlimLinear4bit`: `weight` (uint8 packed codes, `(ceil(out*in/2), 1)`), `weight_absmax`,
  and with double quantization `weight_nested_absmax`, `weight_nested_offset`.
- `SlimLinear8bit`: `weight` (int8 `(out, in)`), `SCB` (float32 row absmax, bitsandbytes' name).
- `SlimLinearInt4`: `weight` (uint8 packed codes, `(ceil(out*in/2), 1)`), `weight_scale` and
  `weight_zero` (float16 `(out, ceil(in / block_size))`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from torch import nn

from llmslim.config import SlimConfig
from llmslim.hf import compat
from llmslim.hf.compat import Conv1D
from llmslim.quant import formats, kernels
from llmslim.quant.registry import LayerSpec

logger = logging.getLogger(__name__)


class SlimLinear(nn.Module):
    """Base of llmslim's quantized linear layers: shapes, bias, compute dtype, construction."""

    fmt: str = ""

    def __init__(self, in_features: int, out_features: int, bias: bool, spec: LayerSpec, dtype: torch.dtype, device=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = spec.compute_dtype or dtype
        self.allow_nonfinite = spec.allow_nonfinite
        self.module_name = ""  # set by `from_linear`; names the layer in errors
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        self._register_quantized(spec, device)

    @classmethod
    def from_linear(cls, linear: nn.Module, spec: LayerSpec, name: str = "") -> SlimLinear:
        """An empty quantized layer with the shape, bias and device of `linear` (nn.Linear or Conv1D);
        `name` (its module name in the model) is used in error messages."""
        if isinstance(linear, Conv1D):
            in_features, out_features = linear.weight.shape
        else:
            in_features, out_features = linear.in_features, linear.out_features
        module = cls(in_features, out_features, linear.bias is not None, spec, linear.weight.dtype, linear.weight.device)
        module.source_transposed = isinstance(linear, Conv1D)
        module.module_name = name
        module.train(linear.training)  # in-place quantization keeps an eval model in eval mode (its CPU layout depends on it)
        return module

    def _register_quantized(self, spec: LayerSpec, device) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def set_float_weight(self, weight: torch.Tensor) -> None:
        """Quantize a float weight (in the layout of the layer this one replaced) into this layer."""
        for name, value in self.quantize(weight).items():
            self._set_tensor(name, value)

    @torch.no_grad()
    def quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """The state-dict tensors (relative names) of a float weight quantized in this layer's format.

        `weight` is in the layout of the layer this one replaced: `(out, in)`, or `(in, out)` for Conv1D.
        """
        if getattr(self, "source_transposed", False):
            weight = weight.t().contiguous()  # Conv1D keeps (in, out)
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"a weight of shape {tuple(weight.shape)} does not fit a layer of shape {(self.out_features, self.in_features)}"
            )
        name = getattr(self, "module_name", "")
        where = f"layer {name!r}" if name else f"a layer of shape {(self.out_features, self.in_features)}"
        check_finite(weight, where, getattr(self, "allow_nonfinite", False))
        return self._quantize(weight)

    def _quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def grid(self) -> formats.Grid:
        """The values each weight element may take with this layer's scales (its absmax / scale and zero fixed)."""
        raise NotImplementedError

    @torch.no_grad()
    def set_codes(self, codes: torch.Tensor) -> None:
        """Store `(out, in)` codes (as `grid().codes` names them) against this layer's scales, which stay as they are."""
        raise NotImplementedError

    def _set_tensor(self, name: str, value: torch.Tensor) -> None:
        if name in self._parameters:
            self._parameters[name] = nn.Parameter(value, requires_grad=False)
        else:
            self._buffers[name] = value

    def own_memory(self) -> None:
        """Give every tensor aligned storage of its own (see `kernels.aligned`)."""
        for name, tensor in list(self.state_dict().items()):
            copy = kernels.aligned(tensor)
            if copy is not tensor:
                self._set_tensor(name, copy)

    def quantized_nbytes(self) -> int:
        """Bytes of this layer's weight as stored: codes plus every scale and absmax (bias excluded)."""
        return formats.quantized_nbytes([t for n, t in self.state_dict().items() if n != "bias"])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, format={self.fmt}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the weight is frozen; an input that needs a gradient (LoRA, a trained layer below) goes
        # through a Function whose backward dequantizes the weight then, keeping nothing alive
        backpropagates = torch.is_grad_enabled() and x.requires_grad
        dense = backpropagates or self.training or x.numel() // max(x.shape[-1], 1) > kernels.DECODE_MAX_TOKENS
        xc = x.to(self._gemm_dtype(x) if dense else self.compute_dtype)
        out = _FrozenWeightMatmul.apply(xc, self) if backpropagates else self._matmul_in(xc)
        return self._add_bias(out).to(x.dtype)

    def _gemm_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The compute dtype of a pass that multiplies by a dense weight (training, its checkpointed forward, a prompt):
        float32 instead of bf16 / fp16 on a CPU that only emulates half-precision GEMMs (about 15x slower there;
        bitsandbytes' own default compute dtype is float32). Decode keeps the compute dtype (its kernels never build a
        dense weight)."""
        half = self.compute_dtype in (torch.bfloat16, torch.float16)
        if half and x.device.type == "cpu" and not kernels.CPU_HALF_MATMUL_IS_NATIVE:
            return torch.float32
        return self.compute_dtype

    def _matmul_in(self, x: torch.Tensor) -> torch.Tensor:
        """`x @ W.T` in `x`'s dtype: the layer's kernel in its compute dtype, else the weight dequantized to that dtype."""
        if x.dtype != self.compute_dtype:
            return x @ self.dequantized_weight(x.dtype).t()
        return self._matmul(x)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        """`x @ W.T` with `x` in the compute dtype, no bias."""
        raise NotImplementedError

    def _add_bias(self, out: torch.Tensor) -> torch.Tensor:
        return out if self.bias is None else out + self.bias.to(out.dtype)


def check_finite(weight: torch.Tensor, where: str, allow: bool = False) -> None:
    """Refuse a float weight holding NaN or Inf (with `allow`, log a warning instead); `where` names its layer.

    Quantization would hide them: NaN is dropped by the absmax of some formats and kept by others,
    and one Inf turns its whole block (with double quantization, the whole weight) into NaN. One
    read of the weight, no copy: min and max propagate NaN, and a non-finite element makes one of
    them non-finite.
    """
    if weight.numel() == 0:
        return
    lo, hi = torch.aminmax(weight.detach())
    if bool(torch.isfinite(lo) & torch.isfinite(hi)):
        return
    n_nan, n_inf = int(torch.isnan(weight).sum()), int(torch.isinf(weight).sum())
    message = f"{where}: its float weight holds {n_nan} NaN and {n_inf} infinite value(s) of {weight.numel()}"
    if allow:
        logger.warning("%s; quantizing it anyway (allow_nonfinite=True): its layer computes NaN or garbage", message)
        return
    raise ValueError(
        f"{message}, which quantization would not preserve (their blocks become NaN, or lose them silently): the weights are "
        "corrupt (a damaged checkpoint or a diverged run); repair or re-download them, exclude the layer, or pass "
        "SlimConfig(allow_nonfinite=True)"
    )


class _FrozenWeightMatmul(torch.autograd.Function):
    """`x @ W.T` for a quantized layer, differentiable in `x` only (the weight is frozen).

    The forward runs the layer's fast kernel; the backward computes `grad @ W` with the weight
    dequantized at that moment, so no float copy of the weight lives between the two passes.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: SlimLinear) -> torch.Tensor:
        ctx.layer = layer
        with torch.no_grad():
            return layer._matmul_in(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ ctx.layer.dequantized_weight(grad.dtype), None


class SlimLinear4bit(SlimLinear):
    """Linear layer with NF4/FP4 blockwise weights (bitsandbytes' layout and kernels)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a decoded token on a CPU with llmslim's decode kernel goes straight to it: the general path's checks cost about
        # 9 us a call in Python (SmolLM2: 210 calls, ~2 ms of a 19 ms token); the same operator, the same bits
        if not x.requires_grad and x.is_cpu and x.numel() <= self.in_features * kernels.DECODE_MAX_TOKENS:
            out = self.decode_rows(x.reshape(-1, self.in_features))
            if out is not None:
                return out.view(*x.shape[:-1], self.out_features)
        return super().forward(x)

    def decode_rows(self, x: torch.Tensor) -> torch.Tensor | None:
        """`forward` for a few rows (2-D, CPU, no gradient: the caller's promise) through llmslim's decode operator, or
        None where it does not run (another dtype, training, no CPU layout). The lean decode step (`hf.decode`) calls it
        directly: each check skipped is ~0.3 us, 210 times per SmolLM2 token."""
        operands = self.decode_operands(x)
        if operands is None:
            return self._decode_rows_i16(x)
        packed, absmax, code, block = operands
        out = torch.ops.llmslim.gemv_4bit_cpu_layout(x, packed, absmax, code, self.out_features, self.in_features, block)
        bias = self._parameters.get("bias")
        return out if bias is None else out + bias.to(out.dtype)

    def _decode_rows_i16(self, x: torch.Tensor) -> torch.Tensor | None:
        """`decode_rows` on an AVX2 CPU: `mm_4bit_i16` on the stored codes, what `kernels.linear_4bit` picks for these
        rows, without the general path's ~10 Python frames per call. Whether it runs, and its operands, are decided at
        the first call and kept while the layer holds the same weight and absmax tensors (a loader, `.to()` or the
        offload manager replaces them), stays in the same mode and gets rows of the same dtype."""
        ops = self.i16_operands(x)
        if ops is None:
            return None
        out = torch.ops.llmslim.mm_4bit_i16(x, *ops, self.out_features, self.block_size)
        bias = self._parameters.get("bias")
        return out if bias is None else out + bias.to(out.dtype)

    def i16_operands(self, x: torch.Tensor) -> tuple | None:
        """(codes, table, absmax, nested absmax, nested map, nested offset) that `mm_4bit_i16` takes for this weight and
        rows `x`, or None where it does not run for them; the caller adds the bias."""
        kept = self.__dict__.get("_i16_kept")
        if (
            kept is None
            or kept[0] is not self._parameters["weight"]
            or kept[1] is not self._buffers["weight_absmax"]
            or kept[2] is not x.dtype
            or kept[3] is not self.training
        ):
            kept = self._keep_i16_operands(x)
        return kept[4] if x.shape[0] <= kernels.I16_4BIT_MAX_TOKENS else None

    def _keep_i16_operands(self, x: torch.Tensor) -> tuple:
        """(weight, absmax, dtype, training, operands) kept on the layer; the operands (codes, table, absmax, nested
        absmax, nested map, nested offset) are None where the general path would not take `mm_4bit_i16` for `x`. A
        double-quantized absmax is kept decoded to float32 (`block_scales_f32`: 4 bytes per block, 1/16 of the codes'
        bytes; the kernel's results are the same bits)."""
        kept = (self._parameters["weight"], self._buffers["weight_absmax"], x.dtype, self.training, None)
        if torch.compiler.is_compiling():  # a traced step decides without keeping anything on the layer
            return kept
        usable = not (
            self.training
            or x.dtype is not self.compute_dtype
            or self.cpu_layout
            or getattr(self, "streamed", False)
            or hasattr(self, "_hf_hook")
            or self.weight.device.type != "cpu"
            or not kernels.i16_takes(x, self.four_bit_weight())  # the row limit is applied per call
        )
        if usable:
            absmax, _, nested_absmax, nested_map, nested_offset = kernels._scale_args(self.four_bit_weight())
            if nested_absmax is not None:  # decoded once: the kernel then reads float32 scales, the same bits, ~25% sooner
                per_row = self.in_features // self.block_size
                absmax = torch.ops.llmslim.block_scales_f32(absmax, nested_absmax, nested_map, nested_offset, per_row)
                nested_absmax = nested_map = nested_offset = None
            kept = (*kept[:4], (self._parameters["weight"], kernels._code_4bit(self.fmt), absmax, nested_absmax, nested_map, nested_offset))
        self.__dict__["_i16_kept"] = kept
        return kept

    def decode_operands(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None:
        """What llmslim's decode operators take for this weight and rows `x` (packed codes, bf16 absmax, code table,
        block size), or None where they do not run; the caller adds the bias."""
        packed, code = self.__dict__.get("_packed_weight"), self.__dict__.get("_decode_code")
        if code is None or x.dtype is not torch.bfloat16 or self.training or self._parameters["weight"] is not packed:
            return None
        return packed, self._buffers["weight_absmax_cpu"], code, self.block_size

    def _register_quantized(self, spec: LayerSpec, device) -> None:
        self.fmt = spec.fmt
        self.block_size = spec.block_size
        n = self.in_features * self.out_features
        n_blocks = -(-n // self.block_size)
        self.weight = nn.Parameter(torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=device), requires_grad=False)
        if spec.double_quant:
            self.register_buffer("weight_absmax", torch.empty(n_blocks, dtype=torch.uint8, device=device))
            n_nested = -(-n_blocks // formats.NESTED_BLOCK_SIZE)
            self.register_buffer("weight_nested_absmax", torch.empty(n_nested, dtype=torch.float32, device=device))
            self.register_buffer("weight_nested_offset", torch.empty((), dtype=torch.float32, device=device))
        else:
            self.register_buffer("weight_absmax", torch.empty(n_blocks, dtype=torch.float32, device=device))

    def _quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        w = kernels.quantize_4bit(weight, self.fmt, self.block_size, "weight_nested_absmax" in self._buffers)
        tensors = {"weight": w.codes, "weight_absmax": w.absmax}
        if w.nested_absmax is not None:
            tensors.update(weight_nested_absmax=w.nested_absmax, weight_nested_offset=w.nested_offset)
        return tensors

    def four_bit_weight(self) -> formats.FourBitWeight:
        """This layer's weight in the format's container: views of its tensors, except the codes
        while they are in the CPU layout (then a row-major copy)."""
        codes = kernels.unpack_4bit_from_cpu(self.weight, self.shape) if self.cpu_layout else self.weight
        return formats.FourBitWeight(
            codes=codes,
            absmax=self.weight_absmax,
            nested_absmax=self._buffers.get("weight_nested_absmax"),
            nested_offset=self._buffers.get("weight_nested_offset"),
            shape=(self.out_features, self.in_features),
            fmt=self.fmt,
            block_size=self.block_size,
        )

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        if self.weight.is_cuda and kernels.bnb_functional() is not None:
            return kernels.dequantize_4bit_bnb_ops(self.four_bit_weight(), self.cuda_tables()[1], dtype or self.compute_dtype)
        return kernels.dequantize_4bit(self.four_bit_weight(), dtype or self.compute_dtype)

    def cuda_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The format's 16 code values and the 8-bit map of double quantization, float32 on the weight's device.

        Kept as non-persistent buffers, made at the first call on the device (not saved; they follow
        the module's `.to()`), so that no call copies a table to the GPU and a compiled step reads them
        as the module's tensors.
        """
        code = self._buffers.get("weight_code_table")
        device = self.weight.device
        if code is None or code.device != device:
            if torch.compiler.is_compiling():  # a step compiled before any eager call: constants
                return formats.code_4bit(self.fmt).to(device), formats.dynamic_map().to(device)
            self.register_buffer("weight_code_table", formats.code_4bit(self.fmt).to(device), persistent=False)
            self.register_buffer("weight_nested_map", formats.dynamic_map().to(device), persistent=False)
        return self.weight_code_table, self.weight_nested_map

    def grid(self) -> formats.Grid:
        absmax = self.four_bit_weight().float_absmax()
        if self.in_features % self.block_size == 0:  # every block within one row: one scale per block of columns
            scale = absmax[: self.out_features * (self.in_features // self.block_size)].view(self.out_features, -1)
            return formats.Grid.of_values(formats.code_4bit(self.fmt), scale, group=self.block_size)
        n = self.in_features * self.out_features  # blocks across rows: one scale per element
        return formats.Grid.of_values(formats.code_4bit(self.fmt), absmax.repeat_interleave(self.block_size)[:n].view(self.shape))

    @torch.no_grad()
    def set_codes(self, codes: torch.Tensor) -> None:
        if self.cpu_layout:
            self._set_cpu_layout(False)
        self._set_tensor("weight", formats.pack_codes(codes).to(self.weight.device))

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and (torch.compiler.is_compiling() or kernels.bnb_functional() is not None):
            code, nested_map = self.cuda_tables()
            return kernels.linear_4bit_bnb_ops(x, self.four_bit_weight(), code, nested_map, self.compute_dtype)
        steady = self.cpu_layout and x.device.type == "cpu" and x.dtype == torch.bfloat16 and not self.training  # CPU inference
        if not steady and not torch.compiler.is_compiling():
            want, stale = self._want_cpu_layout(x), "weight_absmax_cpu" in self._buffers and not self.cpu_layout
            if want != self.cpu_layout or stale:
                self._set_cpu_layout(want)
        if self.cpu_layout:
            return kernels.linear_4bit_packed(x, self.weight, self.weight_absmax_cpu, self.shape, self.fmt, self.block_size)
        return kernels.linear_4bit(x, self.four_bit_weight(), self.compute_dtype)

    # ---- the CPU layout (see kernels.pack_4bit_for_cpu) ----------------------------------------

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def cpu_layout(self) -> bool:
        """Whether `weight` holds its codes in bitsandbytes' CPU layout.

        Set by `_set_cpu_layout`, which remembers the parameter it packed: a weight put in its place
        since (by a loader, accelerate's hooks or the offload manager) is in the stored layout.
        """
        return self._buffers.get("weight_absmax_cpu") is not None and getattr(self, "_packed_weight", None) is self.weight

    def _want_cpu_layout(self, x: torch.Tensor) -> bool:
        """Inference in bfloat16 on a CPU with the kernel, on a weight that stays in this module."""
        return (
            x.device.type == "cpu"
            and x.dtype == torch.bfloat16
            and not self.training
            and not getattr(self, "streamed", False)  # the offload manager swaps its tensors every call
            and not hasattr(self, "_hf_hook")  # accelerate's offload hooks do too
            and self.weight.device.type == "cpu"
            and kernels.cpu_packable(self.shape, self.block_size)
        )

    @torch.no_grad()
    def _set_cpu_layout(self, packed: bool) -> None:
        if packed:
            codes, absmax = kernels.pack_4bit_for_cpu(self.four_bit_weight())
            self.weight = nn.Parameter(codes, requires_grad=False)
            self.register_buffer("weight_absmax_cpu", absmax, persistent=False)  # bf16 (N / 32, K / block, 32), counted as memory
        else:
            if self.cpu_layout:
                self.weight = nn.Parameter(self.four_bit_weight().codes, requires_grad=False)
            self._buffers.pop("weight_absmax_cpu", None)
        self.__dict__["_packed_weight"] = self.weight if packed else None  # a plain reference, not a registered parameter
        # the table `forward`'s decode path passes; None where llmslim's decode kernel does not run (the path is off)
        fast = packed and self.compute_dtype == torch.bfloat16 and kernels.decode_kernels()
        self.__dict__["_decode_code"] = kernels._code_4bit(self.fmt) if fast else None

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.cpu_layout:  # saved, exported and compared in the stored (bitsandbytes) layout
            destination[prefix + "weight"] = self.four_bit_weight().codes

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.cpu_layout:
            self._set_cpu_layout(False)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class SlimLinear8bit(SlimLinear):
    """Linear layer with LLM.int8 weights: int8 rows with one absmax each (`SCB`)."""

    fmt = "int8"

    def _register_quantized(self, spec: LayerSpec, device) -> None:
        self.threshold = spec.int8_threshold
        self.weight = nn.Parameter(torch.empty((self.out_features, self.in_features), dtype=torch.int8, device=device), requires_grad=False)
        self.register_buffer("SCB", torch.empty(self.out_features, dtype=torch.float32, device=device))

    def _quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        q, absmax = kernels.quantize_int8_rows(weight)
        return {"weight": q, "SCB": absmax}

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return formats.dequantize_int8_rows(self.weight, self.SCB, dtype or self.compute_dtype)

    def grid(self) -> formats.Grid:
        return formats.Grid.of_values(torch.arange(-127, 128, dtype=torch.float32), (self.SCB.float() / 127.0).unsqueeze(1))

    @torch.no_grad()
    def set_codes(self, codes: torch.Tensor) -> None:
        self._set_tensor("weight", (codes.long() - 127).to(torch.int8).to(self.weight.device))  # code i stands for i - 127

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear_int8(x, self.weight, self.SCB, self.threshold)


class SlimLinearInt4(SlimLinear):
    """Linear layer with llmslim's groupwise asymmetric int4 weights (see `formats.Int4Weight`)."""

    fmt = "int4"

    def _register_quantized(self, spec: LayerSpec, device) -> None:
        self.group_size = spec.block_size
        self.refine = spec.refine
        n = self.in_features * self.out_features
        groups = -(-self.in_features // self.group_size)
        self.weight = nn.Parameter(torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=device), requires_grad=False)
        self.register_buffer("weight_scale", torch.empty((self.out_features, groups), dtype=torch.float16, device=device))
        self.register_buffer("weight_zero", torch.empty((self.out_features, groups), dtype=torch.float16, device=device))

    def _quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        w = kernels.quantize_int4(weight, self.group_size, self.refine)
        return {"weight": w.codes, "weight_scale": w.scale, "weight_zero": w.zero}

    def int4_weight(self) -> formats.Int4Weight:
        """This layer's weight in the format's container: views of its tensors, except the codes while they are in
        PyTorch's CUDA int4 layout (then a row-major copy read back out of it)."""
        w = formats.Int4Weight(self.weight, self.weight_scale, self.weight_zero, (self.out_features, self.in_features), self.group_size)
        if self.cuda_layout:
            w.codes = kernels.unpack_int4_from_cuda(self.weight, w)
        return w

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return kernels.dequantize_int4(self.int4_weight(), dtype or self.compute_dtype)

    def grid(self) -> formats.Grid:
        return formats.Grid.of_values(formats.int4_lut(), self.weight_scale, self.weight_zero, group=self.group_size)

    @torch.no_grad()
    def set_codes(self, codes: torch.Tensor) -> None:
        if self.cuda_layout:
            self._set_cuda_layout(False)
        self._set_tensor("weight", formats.pack_codes(codes).to(self.weight.device))

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            want = self._want_cuda_layout(x)
            if want != self.cuda_layout:
                self._set_cuda_layout(want)
        if self.cuda_layout:
            return kernels.linear_int4_cuda(x, self.weight, self.weight_scale, self.weight_zero, self.group_size, self.out_features)
        return kernels.linear_int4(x, self.int4_weight(), self.compute_dtype)

    # ---- PyTorch's CUDA int4 layout (see kernels.pack_int4_for_cuda) ---------------------------

    _cuda_layout_failed = False  # set for the process when the kernel disagreed with the reference math once

    @property
    def cuda_layout(self) -> bool:
        """Whether `weight` holds its codes in PyTorch's CUDA int4 layout (set by `_set_cuda_layout`, which remembers the
        parameter it packed: a weight put in its place since is in the stored layout)."""
        packed = getattr(self, "_cuda_packed", None)
        return packed is not None and packed is self.weight

    def _want_cuda_layout(self, x: torch.Tensor) -> bool:
        """Inference in bfloat16 on a GPU whose kernel takes this shape, on a weight that stays in this module."""
        return (
            x.is_cuda
            and x.dtype == torch.bfloat16
            and not self.training
            and not getattr(self, "streamed", False)
            and not hasattr(self, "_hf_hook")
            and self.weight.is_cuda
            and not SlimLinearInt4._cuda_layout_failed
            and kernels.int4pack_usable((self.out_features, self.in_features), self.group_size, self.weight.device)
        )

    @torch.no_grad()
    def _set_cuda_layout(self, packed: bool) -> None:
        if packed:
            w = self.int4_weight()
            codes = kernels.pack_int4_for_cuda(w)
            if not _int4_kernel_agrees(codes, w):
                SlimLinearInt4._cuda_layout_failed = True
                return
            self.weight = nn.Parameter(codes, requires_grad=False)
        elif self.cuda_layout:
            self.weight = nn.Parameter(self.int4_weight().codes, requires_grad=False)
        self.__dict__["_cuda_packed"] = self.weight if packed else None

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.cuda_layout:  # saved, exported and compared in the stored layout
            destination[prefix + "weight"] = self.int4_weight().codes

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.cuda_layout:
            self._set_cuda_layout(False)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


_INT4_KERNEL_CHECKED: set[tuple[int, int, int]] = set()  # shapes (out, in, group) whose CUDA int4 kernel result was checked


def _int4_kernel_agrees(packed: torch.Tensor, w: formats.Int4Weight) -> bool:
    """Whether PyTorch's CUDA int4 kernel on `packed` computes what the reference math does, and gives the codes back.

    Checked once per shape per process (a layout PyTorch changed under us would otherwise compute garbage silently);
    on a mismatch the layer keeps the stored layout and the reference path, with a warning.
    """
    key = (*w.shape, w.group_size)
    if key in _INT4_KERNEL_CHECKED:
        return True
    generator = torch.Generator(packed.device).manual_seed(0)  # its own: a first inference call leaves the user's RNG alone
    x = torch.randn(3, w.shape[1], dtype=torch.bfloat16, device=packed.device, generator=generator)
    expected = x.float() @ formats.dequantize_int4(w, torch.float32).t()
    got = kernels.linear_int4_cuda(x, packed, w.scale, w.zero, w.group_size, w.shape[0]).float()
    error = ((got - expected).abs().max() / expected.abs().max().clamp(min=1e-30)).item()
    round_trip = torch.equal(kernels.unpack_int4_from_cuda(packed, w), w.codes.reshape(-1, 1))
    if error > 0.02 or not round_trip:
        logger.warning(
            "PyTorch's CUDA int4 kernel disagrees with llmslim's int4 math on a %s weight (relative error %.3g, codes read back "
            "equal: %s): int4 layers keep the reference dequantize-then-matmul path on this GPU",
            tuple(w.shape),
            error,
            round_trip,
        )
        return False
    _INT4_KERNEL_CHECKED.add(key)
    return True


def quantizable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D)) and not isinstance(module, SlimLinear)


def replace_linear_modules(model: nn.Module, config: SlimConfig, keep: set[str] = frozenset()) -> list[str]:
    """Swap the layers `config` selects for empty quantized ones, in place.

    Args:
        model: the model, usually a meta-device skeleton.
        config: which format and which layers.
        keep: module names that must stay in float (for example layers tied to an embedding).

    Returns:
        The names of the replaced modules.
    """
    if config.weights is None:
        return []
    replaced = []
    for name, module in quantization_targets(model, config, keep):
        spec = config.layer_spec(name)
        model.set_submodule(name, spec.module_class().from_linear(module, spec, name))
        replaced.append(name)
    if not replaced:
        logger.warning("no linear layer matched include=%s exclude=%s: no linear layer was quantized", config.include, config.exclude)
    return replaced


def prepare_skeleton(model: torch.nn.Module, config: SlimConfig) -> list[str]:
    """Replace the selected layers of a (meta) model by empty llmslim layers."""
    return replace_linear_modules(model, config, keep=compat.tied_module_names(model))


def quantization_targets(model: nn.Module, config: SlimConfig, keep: set[str] = frozenset()) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs `config` quantizes: selected Linear/Conv1D layers not in `keep`."""
    targets = []
    for name, module in list(_selected_modules(model, config)):
        if not quantizable(module):
            logger.info("not quantizing %s: %s layers are not quantized (only Linear and Conv1D)", name, type(module).__name__)
        elif name in keep:
            logger.info("not quantizing %s: its weight is tied to another module", name)
        else:
            targets.append((name, module))
    return targets


def _selected_modules(model: nn.Module, config: SlimConfig) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if not name or not config.selects(name):
            continue
        if quantizable(module):
            yield name, module
        elif config.include is not None and not any(True for _ in module.children()):
            yield name, module  # explicitly included leaf of another type: reported and skipped


def quantized_layers(model: nn.Module) -> Iterator[tuple[str, SlimLinear]]:
    for name, module in model.named_modules():
        if isinstance(module, SlimLinear):
            yield name, module
