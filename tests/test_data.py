"""The texts the defaults need ship inside the package, byte for byte, and work with nothing beside the package."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from test_cli import tiny_with_tokenizer  # noqa: F401 - fixture

from llmslim.data import TINY_SHAKESPEARE, WIKITEXT2_TEST

REPO = Path(__file__).resolve().parents[1]
SHIPPED = {
    "llmslim/data/wikitext-2-raw/wiki.test.raw": (1_290_547, "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c"),
    "llmslim/data/tinyshakespeare/input.txt": (1_115_394, "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"),
}


@pytest.mark.parametrize("relative", sorted(SHIPPED))
def test_shipped_texts_are_byte_for_byte(relative):
    data = (REPO / relative).read_bytes()
    assert (len(data), hashlib.sha256(data).hexdigest()) == SHIPPED[relative]


def test_defaults_point_inside_the_package():
    from llmslim.cli._training import DEFAULT_TRAIN_TEXT
    from llmslim.cli.eval import DEFAULT_TEXT

    package = REPO / "llmslim"
    assert DEFAULT_TEXT == WIKITEXT2_TEST and DEFAULT_TRAIN_TEXT == TINY_SHAKESPEARE
    assert package in DEFAULT_TEXT.parents and package in DEFAULT_TRAIN_TEXT.parents


def test_no_module_refers_to_the_sibling_shared_folder():
    offenders = [str(p) for p in (REPO / "llmslim").rglob("*.py") if '"shared" / "data"' in p.read_text(encoding="utf-8")]
    assert offenders == []


def test_eval_with_default_text_runs_from_a_copy_without_shared(tiny_with_tokenizer, tmp_path):  # noqa: F811
    """`llmslim eval` with no --text, from a copy of the package that has no ../shared beside it."""
    clone = tmp_path / "clone"
    shutil.copytree(REPO / "llmslim", clone / "llmslim", ignore=shutil.ignore_patterns("__pycache__"))
    assert not (clone.parent / "shared").exists()
    env = {**os.environ, "PYTHONPATH": str(clone)}
    code = "import llmslim, sys; assert llmslim.__file__.startswith(sys.argv[1]), llmslim.__file__"
    subprocess.run([sys.executable, "-c", code, str(clone)], env=env, cwd=tmp_path, check=True)
    result = subprocess.run(
        [sys.executable, "-m", "llmslim", "eval", str(tiny_with_tokenizer), "--tokens", "200", "--weights", "nf4"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "perplexity:" in result.stdout


@pytest.mark.slow
def test_wheel_carries_the_texts(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(REPO)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (wheel,) = tmp_path.glob("llmslim-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        for relative, (size, digest) in SHIPPED.items():
            data = archive.read(relative)
            assert (len(data), hashlib.sha256(data).hexdigest()) == (size, digest)
        assert "llmslim/data/README.md" in archive.namelist()
