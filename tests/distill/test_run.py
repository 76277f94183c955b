"""distill() end to end on tiny models (causal, quantized teacher, masked LM, bare encoder) and its bad inputs."""

from __future__ import annotations

import json

import pytest
import torch
from train.tiny import train_config, write_bert, write_causal, write_text
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

from llmslim.distill import DistillConfig, distill


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return write_causal(tmp_path_factory.mktemp("teacher") / "llama")


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("text"))


@pytest.fixture(scope="module")
def finished(teacher, text, tmp_path_factory):
    """A finished 4-step run with checkpoints: (config, train config, result)."""
    root = tmp_path_factory.mktemp("run")
    config = DistillConfig(out=root / "student", teacher=teacher, student_layers=2, train=text, block_size=16, eval_tokens=64)
    train = train_config(steps=4, batch_size=4, lr=1e-3, eval_every=2, save_every=2, run_dir=root / "student-run")
    return config, train, distill(config, train, progress=False)


def test_student_is_a_standard_hf_folder(finished):
    config, _, result = finished
    saved = json.loads((config.out / "config.json").read_text())
    assert "quantization_config" not in saved and saved["num_hidden_layers"] == 2
    student = AutoModelForCausalLM.from_pretrained(config.out)
    assert AutoTokenizer.from_pretrained(config.out)("to be").input_ids
    assert result.layer_map == [0, 3] and result.student_params < result.teacher_params
    for name, tensor in student.state_dict().items():
        torch.testing.assert_close(tensor, result.student.state_dict()[name])


def test_run_logs_evaluations_and_checkpoints(finished):
    config, train, result = finished
    evals = [r for r in result.history if "eval_perplexity" in r]
    assert [r["step"] for r in evals] == [2, 4] and result.metrics["eval_perplexity"] == evals[-1]["eval_perplexity"]
    assert sorted(p.name for p in (train.run_dir / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]
    assert (train.run_dir / "log.jsonl").is_file()


def test_resume_from_another_configuration_fails_before_loading(finished, tmp_path):
    config, train, _ = finished
    other = DistillConfig(out=tmp_path / "s", teacher=config.teacher, student_layers=2, train=config.train, block_size=16, alpha_kd=1.0)
    with pytest.raises(ValueError, match=r"another configuration \(alpha_kd: checkpoint 0.5, now 1.0\)"):
        distill(other, train, resume=train.run_dir, progress=False)
    scheduled = DistillConfig(**{**vars(config), "out": tmp_path / "s2", "kd_ratio_end": 0.25})
    with pytest.raises(ValueError, match=r"another configuration \(kd_ratio_end: checkpoint None, now 0.25\)"):
        distill(scheduled, train, resume=train.run_dir, progress=False)


def test_resumed_distillation_equals_uninterrupted(finished, tmp_path):
    config, train, result = finished
    again = DistillConfig(**{**vars(config), "out": tmp_path / "student"})
    resumed = distill(again, train, resume=train.run_dir / "checkpoints" / "step-0000002", progress=False)
    for name, tensor in result.student.state_dict().items():
        assert torch.equal(tensor, resumed.student.state_dict()[name]), name


def test_nf4_teacher(teacher, text, tmp_path):
    config = DistillConfig(out=tmp_path / "s", teacher=teacher, student_layer_map=[1, 2], teacher_weights="nf4", train=text, block_size=16)
    result = distill(config, train_config(steps=2, batch_size=2), progress=False)
    assert result.metrics["eval_perplexity"] > 1 and result.layer_map == [1, 2]


def test_masked_lm_encoder(text, tmp_path):
    bert = write_bert(tmp_path / "bert")
    config = DistillConfig(out=tmp_path / "s", teacher=bert, student_layers=2, train=text, block_size=16, cos_layers="mapped")
    result = distill(config, train_config(steps=2, batch_size=2), progress=False)
    assert set(result.metrics) == {"eval_perplexity", "eval_cosine"}
    assert AutoModelForMaskedLM.from_pretrained(config.out).config.num_hidden_layers == 2


def test_bare_encoder_distills_hidden_states_only(text, tmp_path):
    bert = write_bert(tmp_path / "bert", head=False)
    with pytest.raises(ValueError, match=r"no language-modelling head.*--alpha-kd 0 --alpha-lm 0"):
        distill(DistillConfig(out=tmp_path / "s", teacher=bert, train=text, block_size=16), train_config(steps=1), progress=False)
    config = DistillConfig(out=tmp_path / "s", teacher=bert, train=text, block_size=16, alpha_kd=0, alpha_lm=0)
    result = distill(config, train_config(steps=2, batch_size=2), progress=False)
    assert set(result.metrics) == {"eval_cosine"} and -1 <= result.metrics["eval_cosine"] <= 1


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"student_layer_map": [0, 4]}, ValueError, r"index 4 out of range: the teacher has layers 0..3"),
        ({"student_layers": 9}, ValueError, "between 1 and the teacher's 4 layers, got 9"),
        ({"block_size": 4096}, ValueError, "fewer than one block of block_size=4096"),
        ({"teacher_weights": "nf4", "objective": "masked"}, ValueError, "quantizes causal LMs only"),
    ],
)
def test_bad_inputs_fail_before_training(teacher, text, tmp_path, change, error, match):
    config = DistillConfig(**{"out": tmp_path / "s", "teacher": teacher, "train": text, "block_size": 16, **change})
    with pytest.raises(error, match=match):
        distill(config, train_config(steps=1), progress=False)


def test_student_with_another_vocabulary(teacher, text, tmp_path):
    other = write_causal(tmp_path / "other", layers=2, vocab=80)
    config = DistillConfig(out=tmp_path / "s", teacher=teacher, student=other, train=text, block_size=16)
    with pytest.raises(ValueError, match=r"vocabularies differ \(teacher vocab_size 64, student 80\)"):
        distill(config, train_config(steps=1), progress=False)


def test_empty_data(teacher, tmp_path):
    config = DistillConfig(out=tmp_path / "s", teacher=teacher, train=write_text(tmp_path, "\n \n"), block_size=16)
    with pytest.raises(ValueError, match="holds no text"):
        distill(config, train_config(steps=1), progress=False)


def test_existing_output_needs_overwrite(teacher, text, tmp_path):
    (tmp_path / "s").mkdir()
    with pytest.raises(FileExistsError, match="--overwrite"):
        distill(DistillConfig(out=tmp_path / "s", teacher=teacher, train=text, block_size=16), train_config(steps=1), progress=False)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha_kd": 0, "alpha_lm": 0, "alpha_cos": 0}, "all 0"),
        ({"temperature": 0}, "temperature must be > 0, got 0"),
        ({"kd_ratio_end": 1.5}, r"kd_ratio_end must be in \[0, 1\], got 1.5"),
        ({"kd_ratio_end": 0.5, "alpha_kd": 0, "alpha_lm": 0}, r"kd_ratio_end=0.5 shares .* both are 0: give --kd-ratio"),
        ({"teacher_weights": "int3"}, r"teacher_weights must be one of \['none', 'int8', 'nf4', 'fp4', 'int4'\], got 'int3'"),
        ({"student_layers": 2, "student_layer_map": [0]}, "give one of student_layers, student_layer_map and student"),
    ],
)
def test_bad_distill_config(kwargs, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        DistillConfig(out=tmp_path, train="x.txt", **kwargs)


def test_out_apart_from_the_teacher_the_student_and_the_run_folder(teacher, text, tmp_path):
    import shutil

    own = shutil.copytree(teacher, tmp_path / "teacher")
    before = {p.name: p.read_bytes() for p in own.iterdir()}
    for kwargs, problem in [
        ({"teacher": own, "student_layers": 2, "out": tmp_path}, r"contains the teacher model \S+/teacher: replacing \S+ would delete it"),
        ({"teacher": teacher, "student": own, "out": own}, r"is the student model \(\S+/teacher\): writing there would replace it"),
    ]:
        config = DistillConfig(**{"train": text, "block_size": 16, "overwrite": True, **kwargs})
        with pytest.raises(ValueError, match=f"the --out \\S+ {problem}; choose another --out"):
            distill(config, train_config(steps=1), progress=False)
    assert {p.name: p.read_bytes() for p in own.iterdir()} == before
    config = DistillConfig(out=tmp_path / "s", teacher=teacher, student_layers=2, train=text, block_size=16)
    with pytest.raises(ValueError, match=r"the run folder \S+/s/run \(checkpoints, log\) is inside the output folder \S+/s"):
        distill(config, train_config(steps=1, run_dir=tmp_path / "s" / "run"), progress=False)
