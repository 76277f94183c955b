"""The teacher cache: top-k KL against the full KL, the cache's shards and manifest, resume, refusals, and a cached
run against an online one."""

from __future__ import annotations

import pytest
import torch
from train.tiny import VOCAB, char_tokenizer, llama_config, train_config, write_causal, write_text
from transformers import AutoConfig, AutoModelForCausalLM

from llmslim.cli import script_main
from llmslim.distill import DistillConfig, distill
from llmslim.distill import cache as cache_module
from llmslim.distill.cache import CacheKey, TeacherCache
from llmslim.distill.losses import TeacherTopK, kd_loss, topk_kd_loss


def _logits(seed: int, vocab: int = 50) -> torch.Tensor:
    return torch.randn(2, 5, vocab, generator=torch.Generator().manual_seed(seed)) * 3  # (batch, seq, vocab)


MASK = torch.tensor([[True] * 5, [True, True, True, False, False]])


@pytest.mark.parametrize("divergence", ["forward", "reverse"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_kd_equals_full_kd_when_k_is_the_vocabulary(divergence, temperature):
    student, teacher = _logits(0).requires_grad_(), _logits(1)
    full = kd_loss(student, teacher, MASK, temperature, divergence)
    (full_grad,) = torch.autograd.grad(full, student)
    top = topk_kd_loss(student, TeacherTopK.from_logits(teacher, 50, temperature), MASK, temperature, divergence)
    (top_grad,) = torch.autograd.grad(top, student)
    torch.testing.assert_close(top, full)
    torch.testing.assert_close(top_grad, full_grad)
    assert torch.isfinite(top_grad).all()


def test_forward_topk_kd_is_below_the_full_kd_by_the_tails_share_of_it():
    """Grouping the tail into one outcome: KL(p || q) = KL over k + 1 outcomes + p_tail * KL(p_tail-normalised || q_tail-normalised)."""
    student, teacher, k = _logits(2), _logits(3), 8
    full = kd_loss(student, teacher, MASK, 1.0)
    top = topk_kd_loss(student, TeacherTopK.from_logits(teacher, k, 1.0), MASK, 1.0)
    log_p, log_q = teacher[MASK].log_softmax(-1), student[MASK].log_softmax(-1)  # (n, vocab)
    tail = torch.ones_like(log_p, dtype=torch.bool).scatter(-1, teacher[MASK].topk(k, -1).indices, False)
    p_tail = (log_p.exp() * tail).sum(-1)
    within = log_p.masked_fill(~tail, float("-inf")).log_softmax(-1), log_q.masked_fill(~tail, float("-inf")).log_softmax(-1)
    gap = p_tail * (within[0].exp() * (within[0] - within[1])).nan_to_num().sum(-1)
    assert 0 < (full - top).item() and (full - top).item() == pytest.approx(gap.mean().item(), rel=1e-4)


@pytest.mark.parametrize("divergence", ["forward", "reverse"])
def test_the_students_tail_from_its_kept_mass_equals_the_sum_over_the_vocabulary(divergence):
    """The tail is log(1 - kept mass) without a vocabulary-wide tensor, except where that mass is nearly all (then summed
    exactly): loss and gradient equal the tail summed over every other token, confident rows and empty tails included."""
    student, teacher, k = _logits(4), _logits(5), 8
    student[0, 0, teacher[0, 0].topk(k).indices[0]] += 40.0  # a row whose tail mass is ~e-40: summed exactly
    cached = TeacherTopK.from_logits(teacher, k, 1.0)
    cached.tail[1, 2] = float("-inf")  # an empty tail (k covers the vocabulary there)

    def by_the_vocabulary(logits):
        log_q = logits[MASK].log_softmax(-1)
        values, ids, tail = cached.values[MASK], cached.ids[MASK].long(), cached.tail[MASK]
        total = torch.logsumexp(torch.cat([values, tail[:, None]], -1), -1, keepdim=True)
        empty = torch.isneginf(tail)[:, None]
        rest = log_q.scatter(-1, ids, float("-inf")).masked_fill(empty, 0.0)
        q_tail = torch.logsumexp(rest, -1, keepdim=True).masked_fill(empty, float("-inf"))
        log_p, log_q = torch.cat([values - total, tail[:, None] - total], -1), torch.cat([log_q.gather(-1, ids), q_tail], -1)
        if divergence == "reverse":
            log_p, log_q = log_q, log_p
        live = ~torch.isneginf(log_p)
        return (live * log_p.masked_fill(~live, 0).exp() * (log_p - log_q).masked_fill(~live, 0)).sum(-1).mean()

    ours, reference = student.clone().requires_grad_(), student.clone().requires_grad_()
    fast, slow = topk_kd_loss(ours, cached, MASK, 1.0, divergence), by_the_vocabulary(reference)
    fast.backward()
    slow.backward()
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.grad, reference.grad, rtol=1e-4, atol=1e-7)
    assert torch.isfinite(ours.grad).all()


def test_reverse_kd_by_hand():
    teacher, student = torch.tensor([[[0.0, 0.0]]]), torch.tensor([[[torch.log(torch.tensor(3.0)), 0.0]]])
    expected = 0.75 * torch.log(torch.tensor(0.75 / 0.5)) + 0.25 * torch.log(torch.tensor(0.25 / 0.5))  # KL(q || p)
    assert kd_loss(student, teacher, torch.tensor([[True]]), 1.0, "reverse").item() == pytest.approx(expected.item())


# --- the cache on disk ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    return write_causal(tmp_path_factory.mktemp("teacher") / "llama")


def _key(path, blocks, k=16, temperature=1.0):
    return CacheKey.of(path, AutoConfig.from_pretrained(path), "none", None, char_tokenizer(), blocks, k, temperature)


def _blocks(n=80, length=8):
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(0))


USED = list(range(0, 80, 2)) + [1, 79, 77]  # 43 of the 80 blocks: a run reads only some


def build_cache(folder, key, blocks, teacher, used=USED):
    cache = TeacherCache.open(folder, key)
    cache.fill(blocks, used, teacher, batch_size=4, progress=False)
    return cache


def test_cache_holds_the_teachers_top_k_of_every_block(teacher_path, tmp_path):
    teacher, blocks = AutoModelForCausalLM.from_pretrained(teacher_path).eval(), _blocks()
    cache = build_cache(tmp_path / "c", _key(teacher_path, blocks), blocks, teacher, used=USED[:10])
    assert cache.missing(USED) == sorted(USED[10:]) and cache.rows == {b: (0, row) for row, b in enumerate(USED[:10])}
    cache.fill(blocks, USED, teacher, progress=False)  # a longer run: the blocks it lacks, 64 to a shard
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["manifest.json", "shard-00000.safetensors", "shard-00001.safetensors"]
    index = torch.tensor([79, 2, 64])
    read = cache.read(index)
    with torch.no_grad():
        expected = TeacherTopK.from_logits(teacher(blocks[index]).logits, 16, 1.0)
    for name in ("values", "ids", "tail"):
        torch.testing.assert_close(getattr(read, name), getattr(expected, name))
    assert cache.nbytes() >= len(USED) * 8 * (16 * 8 + 4)
    assert TeacherCache.open(tmp_path / "c", _key(teacher_path, blocks)).rows == cache.rows
    with pytest.raises(ValueError, match="training block 3 is not in the teacher cache"):
        cache.read(torch.tensor([3]))


@pytest.mark.parametrize(
    ("change", "field"),
    [(dict(k=8), "k"), (dict(temperature=2.0), "temperature"), (dict(blocks=_blocks() + 1), "data_sha256")],
)
def test_a_cache_of_another_run_is_refused_and_left_as_it_is(teacher_path, tmp_path, change, field):
    teacher, blocks = AutoModelForCausalLM.from_pretrained(teacher_path).eval(), _blocks()
    build_cache(tmp_path / "c", _key(teacher_path, blocks), blocks, teacher)
    before = {p.name: p.read_bytes() for p in (tmp_path / "c").iterdir()}
    other = _key(teacher_path, change.pop("blocks", blocks) % VOCAB, **change)
    with pytest.raises(ValueError, match=f"built for another run: {field} is .* there and .* now; use another --teacher-cache"):
        TeacherCache.open(tmp_path / "c", other)
    assert {p.name: p.read_bytes() for p in (tmp_path / "c").iterdir()} == before


def test_an_interrupted_build_resumes_to_identical_shards(teacher_path, tmp_path, monkeypatch):
    monkeypatch.setattr(cache_module, "BLOCKS_PER_SHARD", 16)  # the 43 blocks in 3 shards
    teacher, blocks = AutoModelForCausalLM.from_pretrained(teacher_path).eval(), _blocks()
    key = _key(teacher_path, blocks)
    build_cache(tmp_path / "whole", key, blocks, teacher)
    write = cache_module._write_shard
    written = []

    def interrupted(path, tensors):
        if written:
            raise KeyboardInterrupt
        written.append(path.name)
        write(path, tensors)

    monkeypatch.setattr(cache_module, "_write_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_cache(tmp_path / "c", key, blocks, teacher)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["manifest.json", "shard-00000.safetensors"]  # no partial file
    monkeypatch.setattr(cache_module, "_write_shard", lambda path, tensors: (written.append(path.name), write(path, tensors)))
    resumed = build_cache(tmp_path / "c", key, blocks, teacher)
    names = ["shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]
    assert written == names and not resumed.missing(USED)
    for name in names:
        assert (tmp_path / "c" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()


def test_truncated_shard_foreign_folder_and_oversized_k_are_refused(teacher_path, tmp_path):
    teacher, blocks = AutoModelForCausalLM.from_pretrained(teacher_path).eval(), _blocks()
    key = _key(teacher_path, blocks)
    build_cache(tmp_path / "c", key, blocks, teacher)
    shard = tmp_path / "c" / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match="shard .*shard-00000.safetensors cannot be read .*truncated or damaged"):
        TeacherCache.open(tmp_path / "c", key)
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"holds \['notes.txt'\] but no manifest.json: it is not a teacher cache"):
        build_cache(tmp_path / "f", key, blocks, teacher)
    assert (tmp_path / "f" / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match=f"k must be between 1 and the teacher's vocabulary size {VOCAB}, got {VOCAB + 1}"):
        _key(teacher_path, blocks, k=VOCAB + 1)


# --- runs -----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("text"))


def _run(teacher_path, text, out, **options):
    options = {"student_layers": 2, **options}
    config = DistillConfig(out=out, teacher=teacher_path, train=text, block_size=16, eval_tokens=64, **options)
    train = train_config(steps=3, batch_size=4, lr=1e-3, log_every=1, run_dir=out.with_name(out.name + "-run"))
    return distill(config, train, progress=False)


def test_cached_run_with_the_whole_vocabulary_trains_as_the_online_run(teacher_path, text, tmp_path):
    online = _run(teacher_path, text, tmp_path / "online")
    cached = _run(teacher_path, text, tmp_path / "cached", teacher_cache=tmp_path / "cache", cache_k=VOCAB)
    losses = [[r["loss"] for r in result.history if "loss" in r] for result in (online, cached)]
    assert len(losses[0]) == 3 and losses[0] == pytest.approx(losses[1], rel=1e-4)
    again = _run(teacher_path, text, tmp_path / "again", teacher_cache=tmp_path / "cache", cache_k=VOCAB)  # read, not rebuilt
    assert [r["loss"] for r in again.history if "loss" in r] == losses[1]


def test_cached_run_does_not_load_the_teacher_once_the_cache_exists(teacher_path, text, tmp_path, monkeypatch):
    _run(teacher_path, text, tmp_path / "first", teacher_cache=tmp_path / "cache")
    from llmslim.distill import run

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher was loaded although the cache is complete")

    monkeypatch.setattr(run, "load_teacher", no_teacher)
    result = _run(teacher_path, text, tmp_path / "second", teacher_cache=tmp_path / "cache")
    assert result.metrics["eval_perplexity"] > 1


def test_cache_refuses_the_cosine_loss_and_the_cli_names_the_mismatch(teacher_path, text, tmp_path, capsys):
    with pytest.raises(ValueError, match="a teacher cache holds logits of a causal LM only: pass --alpha-cos 0"):
        _run(teacher_path, text, tmp_path / "s", teacher_cache=tmp_path / "cache", recipe="distilbert")
    base = [str(teacher_path), "--train", str(text), "--student-layers", "2", "--seq-len", "16", "--steps", "1", "--no-progress"]
    assert script_main("distill", [*base, "--out", str(tmp_path / "a"), "--teacher-cache", str(tmp_path / "c2")]) == 0
    capsys.readouterr()
    code = script_main("distill", [*base, "--out", str(tmp_path / "b"), "--teacher-cache", str(tmp_path / "c2"), "--temperature", "2"])
    assert code == 2 and "temperature is 1.0 there and 2.0 now" in capsys.readouterr().err


def test_teacher_and_student_vocabularies_must_match(teacher_path, text, tmp_path):
    other = tmp_path / "other"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(llama_config(2, vocab=VOCAB + 8)).save_pretrained(other)
    with pytest.raises(ValueError, match=rf"vocabularies differ \(teacher vocab_size {VOCAB}, student {VOCAB + 8}\)"):
        _run(teacher_path, text, tmp_path / "s", student=other, student_layers=None)


def test_cache_only_fills_the_cache_and_makes_no_student(teacher_path, text, tmp_path, capsys):
    argv = [str(teacher_path), "--train", str(text), "--student-layers", "2", "--seq-len", "16", "--steps", "2", "--batch-size", "3"]
    argv += ["--out", str(tmp_path / "s"), "--teacher-cache", str(tmp_path / "c"), "--cache-only", "--no-progress"]
    assert script_main("distill", argv) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed.startswith(f"teacher cache {tmp_path / 'c'}: 6 blocks,") and printed.endswith("B/token)")
    assert not (tmp_path / "s").exists() and (tmp_path / "c" / "shard-00000.safetensors").is_file()


def test_a_teacher_offloaded_to_disk_fills_the_same_cache_as_one_in_memory(teacher_path, text, tmp_path):
    """`--teacher-offload disk` under a budget that holds only what is outside the blocks and two streamed blocks:
    every block is written to the run's offload folder and streamed back for each batch; the cache equals the one of
    the same quantized teacher held in memory."""
    from safetensors.torch import load_file

    base = [str(teacher_path), "--train", str(text), "--student-layers", "2", "--seq-len", "16", "--steps", "2", "--batch-size", "3"]
    base += ["--teacher-weights", "nf4", "--cache-only", "--no-progress"]
    assert script_main("distill", [*base, "--out", str(tmp_path / "a"), "--teacher-cache", str(tmp_path / "ram")]) == 0
    disk = ["--out", str(tmp_path / "b"), "--teacher-cache", str(tmp_path / "disk"), "--run-dir", str(tmp_path / "run")]
    assert script_main("distill", [*base, *disk, "--teacher-offload", "disk", "--teacher-offload-budget", "28KiB"]) == 0
    offloaded = [f for f in (tmp_path / "run" / "teacher-offload").rglob("*") if f.is_file()]
    assert offloaded and sum(f.stat().st_size for f in offloaded) > 0
    shard = "shard-00000.safetensors"
    ram, disk = load_file(tmp_path / "ram" / shard), load_file(tmp_path / "disk" / shard)
    assert ram.keys() == disk.keys() and all(torch.equal(ram[k], disk[k]) for k in ram)


def test_an_offload_budget_without_offload_is_refused(tmp_path):
    with pytest.raises(ValueError, match="teacher_offload_budget='1GiB' needs teacher_offload: add --teacher-offload disk"):
        DistillConfig(out=tmp_path / "s", student_layers=2, teacher_offload_budget="1GiB")
