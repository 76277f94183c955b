"""An import-linter contract type: a package's internals are imported only by its seam modules.

import-linter's own `forbidden` contract sees an external package only as a whole (`transformers`),
so it cannot tell `from transformers import AutoConfig` (public, allowed anywhere) from
`from transformers.pytorch_utils import Conv1D` (internal). This contract reads the import lines
grimp records and refuses any that names a submodule of the guarded packages outside the modules
allowed to (llmslim's `hf/` seam), except the imports listed in `allowed_imports`.

Used from `pyproject.toml` (`[tool.importlinter]`) by `make lint`.
"""

from __future__ import annotations

import re

from grimp import ImportGraph
from importlinter.application import output
from importlinter.domain import fields
from importlinter.domain.contract import Contract, ContractCheck


class InternalsContract(Contract):
    """Options: `packages` (external packages guarded, e.g. transformers), `seams` (modules, with their
    submodules, that may import internals) and `allowed_imports` (`module -> package.submodule` pairs
    allowed elsewhere; each must still exist, so a stale exception is reported)."""

    type_name = "internals"

    packages = fields.ListField(subfield=fields.StringField())
    seams = fields.ListField(subfield=fields.StringField())
    allowed_imports = fields.ListField(subfield=fields.StringField(), required=False, default=[])

    def check(self, graph: ImportGraph, verbose: bool) -> ContractCheck:
        allowed = {tuple(part.strip() for part in pair.split("->")) for pair in self.allowed_imports}
        violations, used = [], set()
        for importer in sorted(graph.modules):
            if importer.split(".")[0] in self.packages or self._in_seam(importer):
                continue
            for package in self.packages:
                for detail in graph.get_import_details(importer=importer, imported=package):
                    submodule = _internal_module(detail["line_contents"], package)
                    if submodule is None:
                        continue
                    if (importer, submodule) in allowed:
                        used.add((importer, submodule))
                        continue
                    violations.append(f"{importer}:{detail['line_number']}: {detail['line_contents']}")
        stale = [f"{a} -> {b}" for a, b in sorted(allowed - used)]
        return ContractCheck(kept=not violations and not stale, metadata={"violations": violations, "stale": stale})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for line in check.metadata["violations"]:
            output.print_error(f"{line}  (internals of {', '.join(self.packages)} belong in {', '.join(self.seams)})")
        for pair in check.metadata["stale"]:
            output.print_error(f"allowed_imports lists {pair}, which no longer exists: remove it")

    def _in_seam(self, module: str) -> bool:
        return any(module == seam or module.startswith(f"{seam}.") for seam in self.seams)


def _internal_module(line: str, package: str) -> str | None:
    """`package.sub...` when an import line names a submodule of `package`, else None (a public import)."""
    match = re.match(rf"\s*(?:from|import)\s+({re.escape(package)}(?:\.\w+)+)", line)
    return match.group(1) if match else None
