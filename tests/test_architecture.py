"""The architecture contract (pyproject.toml's [tool.importlinter]) holds, and it catches what it should."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
sys.path.insert(0, str(REPO))
from scripts.lint_contracts import _internal_module  # noqa: E402

pytestmark = pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter is not installed (pip install -e '.[dev]')")


def lint(cwd: Path, config: Path | None = None) -> subprocess.CompletedProcess:
    args = [str(LINT_IMPORTS)] + (["--config", str(config)] if config else [])
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}  # the contract type lives in scripts/
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def test_llmslim_keeps_its_contracts():
    result = lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 2 kept, 0 broken." in result.stdout


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("from transformers.pytorch_utils import Conv1D", "transformers.pytorch_utils"),
        ("import transformers.integrations.sdpa_attention", "transformers.integrations.sdpa_attention"),
        ("from transformers import AutoConfig", None),
        ("import transformers", None),
        ("from transformers_extra.x import y", None),
    ],
)
def test_internal_module_tells_a_submodule_from_the_public_package(line, expected):
    assert _internal_module(line, "transformers") == expected


def test_the_contracts_catch_an_upward_import_and_an_internal(tmp_path):
    pkg = tmp_path / "toypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "high.py").write_text("from toypkg import low\n")
    (pkg / "low.py").write_text("import toypkg.high\n")  # upward
    (pkg / "model.py").write_text("from transformers.pytorch_utils import Conv1D\nfrom transformers import AutoConfig\n")
    config = tmp_path / "contracts.toml"
    config.write_text(
        textwrap.dedent(
            """
            [tool.importlinter]
            root_package = "toypkg"
            include_external_packages = true
            contract_types = ["internals: scripts.lint_contracts.InternalsContract"]

            [[tool.importlinter.contracts]]
            name = "layers"
            type = "layers"
            containers = ["toypkg"]
            layers = ["high", "low"]

            [[tool.importlinter.contracts]]
            name = "internals"
            type = "internals"
            packages = ["transformers"]
            seams = ["toypkg.seam"]
            """
        )
    )
    result = lint(tmp_path, config)
    assert result.returncode == 1
    assert "Contracts: 0 kept, 2 broken." in result.stdout, result.stdout + result.stderr
    assert "toypkg.low -> toypkg.high" in result.stdout
    assert "toypkg.model:1: from transformers.pytorch_utils import Conv1D" in result.stdout + result.stderr
    assert "AutoConfig" not in result.stdout + result.stderr
