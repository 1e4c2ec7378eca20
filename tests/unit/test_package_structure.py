"""The package's import graph, read from the source (every import, module level or inside a function): no import
circles, and the layers below the model families import none of them."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGE = "torchtitan_hyena"
# Shared layers: they serve every model family, so none of them may import one (or models/common).
NO_MODELS = ("distributed", "components", "ops", "config", "tools", "protocols")
# Entry points under those folders that check the models' own layers (the device self-test runs the attention
# backends against each other); they may import models/common, never a family.
SHARED_LAYER_CHECKERS = (f"{PACKAGE}.tools.selftest",)


def module_names() -> dict[str, Path]:
    """{dotted module name: file} of every module of the package (a package is its ``__init__``)."""
    out = {}
    for path in sorted((REPO / PACKAGE).rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports_of(path: Path, name: str, modules: set[str]) -> set[str]:
    """The package modules ``name`` (at ``path``) imports anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            # ``from a import b`` imports module ``a.b`` when there is one, else names of ``a``
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imports_of(path, name, set(modules)) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_function_level_and_from_imports():
    graph = import_graph()
    assert f"{PACKAGE}.build" in graph[f"{PACKAGE}.train"]  # from torchtitan_hyena import build: a module
    # imported inside a function body (the built-in datasets register on first use)
    assert f"{PACKAGE}.components.datasets.memmap" in graph[f"{PACKAGE}.components.dataloader"]
    hidden = cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})
    assert hidden == [["a", "b", "c"]]


def test_no_import_circles():
    assert cycles(import_graph()) == []


def test_shared_layers_import_no_model_family():
    models = f"{PACKAGE}.models"

    def forbidden(name: str, target: str) -> bool:
        if name.startswith(SHARED_LAYER_CHECKERS) and target.startswith(f"{models}.common."):
            return False
        return target == models or target.startswith(models + ".")

    offenders = {
        name: sorted(t for t in targets if forbidden(name, t))
        for name, targets in import_graph().items()
        if name.split(".")[1:2] and name.split(".")[1] in NO_MODELS
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_entry_points_set_up_through_build():
    """Whatever builds or loads a model does it through build.py: training, evaluation, the dry run, scoring,
    generation and the converters' model rebuilds."""
    graph = import_graph()
    users = ("train", "evaluate", "score", "generate", "tools.dry_run", "convert.evo2", "convert.llama")
    assert [name for name in users if f"{PACKAGE}.build" not in graph[f"{PACKAGE}.{name}"]] == []


def test_the_tests_mirror_the_package():
    """Unit tests live under ``tests/unit/<package path>/``, end-to-end and multi-process runs under
    ``tests/integration/``; a new test file finds its place without asking."""
    tests = REPO / "tests"
    assert not list(tests.glob("test_*.py")), "tests go under tests/unit/<package path>/ or tests/integration/"
    for folder in (tests / "unit").rglob("*"):
        if folder.is_dir() and folder.name != "__pycache__":
            relative = folder.relative_to(tests / "unit")
            assert (REPO / PACKAGE / relative).is_dir(), f"tests/unit/{relative} mirrors no package folder"
    assert not [p for p in (tests / "integration").iterdir() if p.is_dir() and p.name != "__pycache__"]
