"""The flow stays one direction, each target is one folder, and nothing imports in a circle."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "cpm_mobile"
# What runtimes/ may import of the exporter: the bundle contract (with its error type), and nothing else.
RUNTIMES_MAY_IMPORT = ("cpm_mobile.exporter.contract",)
INSTALLED = ("exporter", "runtimes", "recipes")


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([PACKAGE, *parts])


def _product_modules() -> dict[str, Path]:
    modules = {_module_name(ROOT / "cli.py"): ROOT / "cli.py"}
    for folder in INSTALLED:
        modules.update({_module_name(path): path for path in (ROOT / folder).rglob("*.py")})
    return modules


def test_runtimes_import_only_the_bundle_contract_of_the_exporter():
    offenders = {
        str(path.relative_to(ROOT)): sorted(n for n in _imports(path) if n.startswith("cpm_mobile.exporter")
                                            and not n.startswith(RUNTIMES_MAY_IMPORT))
        for path in (ROOT / "runtimes").rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_no_module_imports_by_a_top_level_name_of_ours():
    """Everything installs under cpm_mobile: an `import exporter` would work only from a checkout."""
    bare = ("exporter", "runtimes", "recipes", "cli")
    offenders = {}
    for name, path in _product_modules().items():
        found = [n for n in _imports(path) if n.split(".")[0] in bare]
        if found:
            offenders[name] = found
    assert offenders == {}


def test_the_contract_module_imports_nothing_heavy():
    allowed = ("cpm_mobile.exporter.errors",)
    found = [n for n in _imports(ROOT / "exporter" / "contract.py") if n.startswith("cpm_mobile") and n not in allowed
             and not n.startswith("cpm_mobile.exporter.errors.")]
    assert found == []


def test_no_import_cycles_between_modules():
    """Imports between our modules, deferred ones inside functions included, form no cycle."""
    modules = _product_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        edges = set()
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_each_target_is_one_folder_named_in_one_registry():
    from cpm_mobile.exporter.targets.registry import TARGET_NAMES

    folders = sorted(p.name for p in (ROOT / "exporter" / "targets").iterdir()
                     if p.is_dir() and (p / "__init__.py").exists())
    assert folders == sorted(TARGET_NAMES)
    for name in TARGET_NAMES:
        assert {"spec.py", "target.py", "size.py"} <= {p.name for p in (ROOT / "exporter" / "targets" / name).iterdir()}
    # Outside the registry and the targets' own folders, no product module spells a target's name as a literal;
    # the two that may: the contract reads format-1 bundles (whose caches were named per target), and the
    # pipeline records library versions (the distributions "executorch" and "onnx").
    exempt = {"cpm_mobile.exporter.contract", "cpm_mobile.exporter.pipeline"}
    literal = {f'"{name}"' for name in TARGET_NAMES} | {f"'{name}'" for name in TARGET_NAMES}
    spelled = {}
    for module, path in _product_modules().items():
        if module in exempt or path.is_relative_to(ROOT / "exporter" / "targets") or path.is_relative_to(ROOT / "runtimes"):
            continue
        text = path.read_text(encoding="utf-8")
        hits = [lit for lit in literal if lit in text]
        if hits:
            spelled[module] = hits
    assert spelled == {}


def test_no_target_imports_a_pass():
    for path in (ROOT / "exporter" / "targets").rglob("*.py"):
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
