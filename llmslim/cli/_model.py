"""The model options of `quantize`, `eval`, `generate` and `serve`, and loading a model by them."""

from __future__ import annotations

import argparse

from llmslim.cli._args import add_weights_argument, config_from_args

MODEL_HELP = "model folder or .gguf (default: embedded SmolLM2-135M-Instruct)"


def add_model_arguments(p: argparse.ArgumentParser, default_weights: str | None = None) -> None:
    """--weights, --block-size (absmax block / int4 group), --no-double-quant, --exclude, --include, --dtype, --device-map."""
    add_weights_argument(
        p,
        default=default_weights,
        help="weight format (default: nf4 for a float model, the saved format for an llmslim checkpoint)",
    )
    p.add_argument("--block-size", type=int, default=64, help="elements per absmax block for 4-bit formats (default 64)")
    p.add_argument("--no-double-quant", action="store_true", help="keep 4-bit absmax in float32")
    p.add_argument("--exclude", nargs="*", default=None, help="module-name patterns to keep in float (default: lm_head)")
    p.add_argument("--include", nargs="*", default=None, help="module-name patterns to quantize (default: every linear layer)")
    p.add_argument("--dtype", default=None, help="dtype of the layers kept in float (default: the checkpoint's)")
    p.add_argument("--device-map", default=None, help="'cpu', 'cuda', 'auto' (default: cuda if available)")
    p.add_argument(
        "--decode-head",
        choices=("int8", "float"),  # SlimConfig.decode_head
        default=None,
        help="int8: on CPU a 16-bit output head decodes through an int8 copy (faster, +0.09%% perplexity); "
        "float: keep the float head (default: int8, or what a saved llmslim model says)",
    )
    g = p.add_argument_group("calibration (--method gptq)")
    g.add_argument("--method", choices=("rtn", "gptq"), default="rtn", help="round to nearest, or GPTQ on calibration text (default rtn)")
    g.add_argument("--calibration-text", default=None, help="UTF-8 file or folder to calibrate on (default: the shipped Tiny Shakespeare)")
    g.add_argument(
        "--calibration-tokens", type=int, default=65536, help="tokens of calibration text, in 512-token sequences (default 65536)"
    )
    g.add_argument(
        "--act-order", action=argparse.BooleanOptionalAction, default=True, help="GPTQ: columns by decreasing Hessian diagonal (default on)"
    )
    g.add_argument(
        "--balance", action=argparse.BooleanOptionalAction, default=True, help="GPTQ: AWQ-style input-channel scales (default on)"
    )
    g.add_argument("--damp", type=float, default=0.25, help="GPTQ: Hessian dampening, a share of its mean diagonal (default 0.25)")


def slim_config(args: argparse.Namespace):
    """The SlimConfig of the model options; None when --weights is not given (keep what the checkpoint says)."""
    from llmslim import SlimConfig
    from llmslim.quant.registry import from_choice

    if args.weights is None:
        return None
    return config_from_args(
        SlimConfig,
        args,
        # no --exclude: SlimConfig's default (lm_head); no --decode-head: its default (int8)
        ignore=tuple(name for name in ("exclude", "decode_head") if getattr(args, name) is None),
        weights=from_choice(args.weights),
        double_quant=False if args.no_double_quant else None,
    )


def load(model_arg: str | None, args: argparse.Namespace, *, tokenizer_required: bool = True):
    """Load MODEL per the command-line options; a float model with no --weights gets nf4.

    The tokenizer is None only when MODEL has none and not `tokenizer_required`.
    """
    from transformers import AutoConfig

    import llmslim
    from llmslim import models

    path = models.resolve(None if model_arg in (None, "default") else model_arg)
    config = slim_config(args)
    if config is None and getattr(AutoConfig.from_pretrained(path), "quantization_config", None) is None:
        args.weights = "nf4"
        config = slim_config(args)
    tokenizer = models.load_tokenizer(path, needed_for=f"llmslim {args.command}" if tokenizer_required else None)  # before the weights
    model = llmslim.from_pretrained(
        path,
        config,
        dtype=args.dtype,
        device_map=args.device_map,
        calibration_text=args.calibration_text,
        calibration_tokens=args.calibration_tokens,
    )
    if config is not None and config.weights is not None:
        _check_layers_matched(model, args)
    if config is None and args.decode_head == "float":  # a saved llmslim model: its own config chose the head
        from llmslim.quant.head import use_float_head

        use_float_head(model)
    return model, tokenizer, path


def _check_layers_matched(model, args: argparse.Namespace) -> None:
    """A --include / --exclude pattern that matches no layer, or a selection that quantizes none, is an error, not a float model."""
    import fnmatch

    from llmslim.quant.modules import SlimLinear, quantizable

    names = [name for name, module in model.named_modules() if quantizable(module) or isinstance(module, SlimLinear)]
    options = {"--include": args.include, "--exclude": args.exclude}
    for option, patterns in options.items():
        # matched as SlimConfig.selects matches them: the full name, or its suffix after a dot
        unmatched = [p for p in patterns or [] if not any(fnmatch.fnmatchcase(n, p) or fnmatch.fnmatchcase(n, f"*.{p}") for n in names)]
        if unmatched:
            raise ValueError(f"{option} {' '.join(unmatched)} matched no linear layer; the layers are named like {_examples(names)}")
    if not any(isinstance(module, SlimLinear) for module in model.modules()):
        given = " ".join(f"{option} {' '.join(patterns)}" for option, patterns in options.items() if patterns) or "the options"
        raise ValueError(f"no layer was quantized to {args.weights}: {given} leave every linear layer in float ({_examples(names)})")


def _examples(names: list[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
