"""The flow stays one direction: runtimes/ only opens and runs artifacts; variants are made one way."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What builds or reads checkpoints, tokenizers and bundles: the exporter's side of the flow.
NOT_FOR_RUNTIMES = ("cpm_mobile.exporter.pipeline", "cpm_mobile.exporter.models.loader", "cpm_mobile.exporter.tokenizer", "cpm_mobile.exporter.verify",
                    "cpm_mobile.exporter.bundle_check", "cpm_mobile.exporter.passes", "cpm_mobile.exporter.targets")


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_runtimes_import_no_loader_tokenizer_pipeline_or_target():
    offenders = {
        str(path.relative_to(ROOT)): sorted(n for n in _imports(path) if n.startswith(NOT_FOR_RUNTIMES))
        for path in (ROOT / "runtimes").rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_no_target_imports_a_pass():
    for path in (ROOT / "exporter" / "targets").glob("*.py"):
        assert not [n for n in _imports(path) if n.startswith("cpm_mobile.exporter.passes")], path


def test_model_variants_are_built_in_one_place():
    """Shallow copies with private module tables are exporter/models/variant.py's job alone."""
    users = [
        str(path.relative_to(ROOT)) for folder in ("exporter", "runtimes")
        for path in (ROOT / folder).rglob("*.py")
        if "._modules" in path.read_text(encoding="utf-8") and path.name != "variant.py"
    ]
    assert users == []


def test_no_pass_asks_which_exporter_is_tracing_it():
    for path in (ROOT / "exporter" / "passes").glob("*.py"):
        assert "is_in_onnx_export" not in path.read_text(encoding="utf-8"), path
