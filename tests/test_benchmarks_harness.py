"""The benchmark harness (benchmarks/_harness.py) and the README tables it renders from the committed JSON.

No benchmark runs here: the tables are re-rendered from benchmarks/results/*.json, and the child
runner is checked on a tiny child that allocates a known amount.
"""

from __future__ import annotations

import difflib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))  # the benchmark scripts import each other by name, as when run from there

import _harness  # noqa: E402
import render  # noqa: E402

MB = 10**6
CHILD = """
import sys
sys.path.insert(0, {benchmarks!r})
from _harness import finish_child

size = int(sys.argv[1])
data = b"\\x01" * size  # filled, so every page is resident
sys.exit(finish_child({{"allocated": len(data)}}, sys.argv[sys.argv.index("--result") + 1]))
"""
# The runner runs in a small interpreter of its own: a child's peak RSS starts at the RSS its parent
# had when it started it, and this test process holds torch (conftest imports it).
PARENT = """
import json, sys
sys.path.insert(0, {benchmarks!r})
from _harness import run_child

runs = [run_child({script!r}, [str(size)], timeout=120) for size in (0, {size})]
print(json.dumps([[run.peak_rss_bytes, run.exit_code, run.error, run.result] for run in runs]))
"""


def test_readme_tables_match_the_committed_json():
    text = (BENCHMARKS / "README.md").read_text()
    new = render.rendered(text)
    diff = "".join(difflib.unified_diff(text.splitlines(True), new.splitlines(True), "README.md", "rendered", n=1))
    assert new == text, f"benchmarks/README.md differs from its tables rendered from benchmarks/results/*.json:\n{diff}"


def test_every_readme_block_has_a_renderer_and_its_json():
    text = (BENCHMARKS / "README.md").read_text()
    tables = render.tables()
    assert sorted(render.readme_blocks(text)) == sorted(tables)
    assert {"bench_load", "bench_speed", "bench_quality", "bench_checkpointing", "bench_distill", "bench_gpu"} <= set(tables)


def test_rendering_imports_no_torch():
    code = (
        f"import sys; sys.path.insert(0, {str(BENCHMARKS)!r}); import render; render.tables(); "
        "heavy = {'torch', 'transformers', 'llmslim', 'matplotlib'} & set(sys.modules); assert not heavy, heavy"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_write_json_replaces_the_file_atomically(tmp_path, monkeypatch):
    path = tmp_path / "results" / "bench.json"
    _harness.write_json(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    _harness.write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert os.listdir(path.parent) == ["bench.json"]  # no temporary file left behind

    with pytest.raises(TypeError, match="not JSON serializable"):
        _harness.write_json(path, {"a": object()})

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        _harness.write_json(path, {"a": 3})
    assert json.loads(path.read_text()) == {"a": 2}  # the old file, whole
    assert os.listdir(path.parent) == ["bench.json"]


def test_replace_block():
    text = "# B\n\n<!-- t:start -->\nold\n<!-- t:end -->\n\nprose\n"
    assert _harness.replace_block(text, "t", "new") == "# B\n\n<!-- t:start -->\nnew\n<!-- t:end -->\n\nprose\n"
    assert _harness.replace_block("# B\n", "u", "x", "## U") == "# B\n\n## U\n\n<!-- u:start -->\nx\n<!-- u:end -->\n"
    with pytest.raises(KeyError, match="no <!-- u:start --> ... <!-- u:end --> markers"):
        _harness.replace_block(text, "u", "x")


def test_run_child_reports_the_childs_peak_rss_in_bytes(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(benchmarks=str(BENCHMARKS)))
    size = 200 * MB
    code = PARENT.format(benchmarks=str(BENCHMARKS), script=str(script), size=size)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (bare, bare_exit, bare_error, _), (peak, exit_code, error, result) = json.loads(proc.stdout)
    assert (bare_exit, bare_error, exit_code, error) == (0, None, 0, None)
    assert result == {"allocated": size}
    assert bare < 100 * MB, bare  # an interpreter, not the 200 MB child nor this process
    assert size <= peak <= size + 100 * MB, peak
    assert 0.9 * size <= peak - bare <= 1.1 * size, (bare, peak)


def test_run_child_says_why_a_child_failed(tmp_path):
    crash = tmp_path / "crash.py"
    crash.write_text("import sys\nprint('boom')\nsys.exit(3)\n")
    run = _harness.run_child(crash, [], timeout=60)
    assert (run.exit_code, run.result, run.error) == (3, {}, "child exited with 3: boom")
    assert run.merged(peak_rss_kib=1)["error"] == run.error

    sleeper = tmp_path / "sleep.py"
    sleeper.write_text("import time\ntime.sleep(60)\n")
    run = _harness.run_child(sleeper, [], timeout=0.5)
    assert run.error == "timed out after 0.5 s (killed)"


def test_bench_distill_case_names_and_merge_refusal(tmp_path):
    """`--cases` takes the sweep's recipes and NAME+cache; `--merge` refuses a saved run of other settings, naming it."""
    import bench_distill

    assert bench_distill.case_options("kd_r1.0+cache") == {"kd_ratio": 1.0, "cached": True}
    assert bench_distill.case_options("c_lm_only") == bench_distill.CASES["c_lm_only"]
    with pytest.raises(SystemExit, match="unknown case 'kd_r2'"):
        bench_distill.case_options("kd_r2")
    (tmp_path / "bench_distill.json").write_text(json.dumps({"args": {"steps": 60}, "cases": {}}))
    args = bench_distill.parse_args(["--merge", "--steps", "400", "--cases", "kd_r1.0+cache", "--results", str(tmp_path)])
    with pytest.raises(SystemExit, match="measured with --steps 60, this run has 400"):
        bench_distill.merge(args, tmp_path)
    assert json.loads((tmp_path / "bench_distill.json").read_text()) == {"args": {"steps": 60}, "cases": {}}  # untouched


def test_bench_speed_reports_the_round_with_the_median_decode_rate():
    import bench_speed

    rounds = [
        {"decode_tok_s": 9.0, "prefill_tok_s": 1.0},
        {"decode_tok_s": 3.0, "prefill_tok_s": 2.0},
        {"decode_tok_s": 5.0, "prefill_tok_s": 3.0},
    ]
    chosen = bench_speed.median_round(rounds)
    assert chosen["decode_tok_s"] == 5.0 and chosen["prefill_tok_s"] == 3.0  # the median round's own prefill
    assert chosen["decode_tok_s_rounds"] == [9.0, 3.0, 5.0] and chosen["prefill_tok_s_rounds"] == [1.0, 2.0, 3.0]
    assert bench_speed.median_round(rounds[:2])["decode_tok_s"] == 3.0  # an even count: the lower middle
    assert "decode_tok_s_rounds" not in bench_speed.median_round(rounds[:1])


def test_bench_speed_decode_rate_comes_from_token_timestamps():
    import _models

    rates = _models.decode_rates([(0.0, 2.0, [0.5, 0.75, 1.0, 1.25, 1.5]), (10.0, 12.0, [10.25, 10.75, 11.25, 11.75, 12.0])])
    assert rates["decode_tok_s_runs"] == [4.0, 4 / 1.75] and rates["first_token_s"] == pytest.approx(0.375)
    assert rates["decode_tok_s"] == pytest.approx((4.0 + 4 / 1.75) / 2) and rates["new_tokens"] == 5
    with pytest.raises(ValueError, match="at least 2 new tokens"):
        _models.decode_rates([(0.0, 1.0, [0.5])])
