"""Preflight refusals with the planner's numbers, and the `plan` command's table and JSON."""

from __future__ import annotations

import json
import logging

import pytest

import llmslim
from llmslim.cli import build_parser, plan
from llmslim.plan import PreflightError
from llmslim.plan import preflight as preflight_module


def test_load_that_does_not_fit_is_refused_with_numbers(tiny_llama, monkeypatch):
    monkeypatch.setattr(preflight_module, "available_ram", lambda: 10_000)
    with pytest.raises(PreflightError, match=r"will not fit: cpu: planned peak .*B > 9.77 KiB available\. .*force=True"):
        llmslim.from_pretrained(tiny_llama, llmslim.SlimConfig(weights="nf4"), progress=False)


def test_refusal_suggests_a_format_that_fits(tiny_llama, monkeypatch):
    monkeypatch.setattr(preflight_module, "available_ram", lambda: 30_000)  # int8 (33 kB) does not fit, nf4+dq (22 kB) does
    with pytest.raises(PreflightError, match=r"Planned weights per format: bf16 .*; nf4\+dq fits"):
        llmslim.from_pretrained(tiny_llama, llmslim.SlimConfig(weights=None), progress=False)


def test_max_memory_is_the_limit_and_force_loads_anyway(tiny_llama, caplog):
    with pytest.raises(PreflightError, match="planned peak"):
        llmslim.from_pretrained(tiny_llama, llmslim.SlimConfig(weights="nf4"), max_memory={"cpu": "1KiB"}, progress=False)
    with caplog.at_level(logging.WARNING, logger="llmslim.plan.preflight"):
        model = llmslim.from_pretrained(
            tiny_llama, llmslim.SlimConfig(weights="nf4"), max_memory={"cpu": "1KiB"}, force=True, progress=False
        )
    assert model is not None and "loading anyway: force=True" in caplog.text


def _run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    return plan.run(args)


def test_plan_prints_a_table_for_a_bundled_model(capsys):
    assert _run(["plan", "llama-3-405b", "--gpu", "24GiB", "--cpu", "64GiB", "--disk", "2TB"]) == 0
    out = capsys.readouterr().out
    assert "| nf4+dq |" in out and "fits with disk offload" in out and "suggested:" in out


def test_plan_json_for_a_local_folder(tiny_llama, capsys):
    assert _run(["plan", str(tiny_llama), "--cpu", "8GiB", "--disk", "10GB", "--json", "--tensors", "nf4"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == tiny_llama.name and set(report["formats"]) == {"bf16", "int8", "nf4", "nf4+dq", "int4", "nf4+dq+emb/4"}
    nf4 = report["formats"]["nf4"]
    assert {"weight_bytes", "kv_cache_bytes", "activation_bytes", "total_bytes", "verdict", "tokens_per_s", "device_map"} <= set(nf4)
    assert sum(report["tensors"]["nf4"].values()) == nf4["weight_bytes"]


def test_plan_rejects_a_bad_size():
    with pytest.raises(ValueError, match="a size must look like 24GiB"):
        _run(["plan", "llama-2-7b", "--gpu", "lots"])
