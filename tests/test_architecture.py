"""The shape of the code: which modules may import which.

Imports are read from the source (those inside functions included, since they run too), so
these checks need nothing loaded.
"""

import ast
import itertools
from pathlib import Path
from typing import Dict, Iterator, List, Set

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
APP_FOLDERS = ("handlers", "sessions", "swarm")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def app_modules() -> Dict[str, Path]:
    """The server's modules: the top-level ones and those of its packages (not tests, not bench)."""
    paths = itertools.chain(REPO_ROOT.glob("*.py"), *(REPO_ROOT.glob(f"{folder}/**/*.py") for folder in APP_FOLDERS))
    return {module_name(path): path for path in paths}


def imported_names(path: Path) -> Iterator[str]:
    """Every module name an import in ``path`` names (``from a import b`` names ``a`` and ``a.b``)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def import_graph(modules: Dict[str, Path]) -> Dict[str, Set[str]]:
    """Each module -> the modules of ``modules`` it imports."""
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported in imported_names(path):
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The groups of modules that import each other, directly or not (Tarjan's components)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    found: List[List[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in graph[module]:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            group = []
            while not group or group[-1] != module:
                group.append(stack.pop())
            if len(group) > 1:
                found.append(sorted(group))

    for module in graph:
        if module not in index:
            visit(module)
    return found


def test_the_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_of_the_app_imports_one_that_imports_it_back():
    assert cycles(import_graph(app_modules())) == []


@pytest.mark.parametrize("importer, forbidden", [
    ("sessions.engine", "sessions.serving"),  # the engine runs one generation; the policy builds on it
    ("sessions", "tornado"),  # the handlers turn the session side's errors into wire replies
    ("sessions", "handlers"),
    ("swarm", "sessions"),
    ("swarm", "handlers"),
    # keys and limits need no swarm: the keys command starts at once
    ("sessions.accounts", "sessions.serving"),
    ("sessions.accounts", "sessions.engine"),
    ("sessions.accounts", "torch"),
    ("sessions.accounts", "swarm"),
])
def test_the_layers_import_downwards_only(importer, forbidden):
    offending = {name: sorted(target for target in imported_names(path)
                              if target == forbidden or target.startswith(forbidden + "."))
                 for name, path in app_modules().items() if name == importer or name.startswith(importer + ".")}
    assert {name: targets for name, targets in offending.items() if targets} == {}


def test_the_benchmarks_import_nothing_from_the_tests():
    importing = {module_name(path): sorted(name for name in imported_names(path) if name.split(".")[0] == "tests")
                 for path in REPO_ROOT.glob("bench/*.py")}
    assert {name: names for name, names in importing.items() if names} == {}
