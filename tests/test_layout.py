"""The house rules of the code: packages by concern, small modules, no import circles, no torch in
the daemon."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

AGENT = ROOT / "agent"
MAX_MODULE_LINES = 400


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(AGENT.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def runtime_imports(path: Path, known: set[str], *, for_types: bool = False) -> set[str]:
    """Return the agent modules ``path`` imports when it is imported (not inside functions; under
    TYPE_CHECKING only when ``for_types``)."""
    tree = ast.parse(path.read_text())
    imported = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test) and not for_types:
            continue
        for child in [node] if not isinstance(node, ast.If) else node.body:
            if isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                imported.add(child.module)
                imported.update(f"{child.module}.{alias.name}" for alias in child.names)
            elif isinstance(child, ast.Import):
                imported.update(alias.name for alias in child.names)
    return {name for name in imported if name in known}


def test_no_module_is_over_400_lines_and_every_package_says_what_it_owns():
    for name, path in modules().items():
        lines = len(path.read_text().splitlines())
        assert lines <= MAX_MODULE_LINES, f"{name}: {lines} lines"
        if path.name == "__init__.py":
            docstring = ast.get_docstring(ast.parse(path.read_text()))
            assert docstring, f"{name} has no line saying what it owns"


def test_no_import_circle():
    found = modules()
    graph = {name: runtime_imports(path, set(found)) - {name} for name, path in found.items()}

    def visit(name: str, trail: list[str]) -> None:
        assert name not in trail, "import circle: " + " -> ".join([*trail, name])
        for imported in graph[name]:
            visit(imported, [*trail, name])

    for name in graph:
        visit(name, [])


def test_no_two_modules_import_each_other_even_for_types():
    found = modules()
    graph = {
        name: runtime_imports(path, set(found), for_types=True) - {name}
        for name, path in found.items()
    }
    pairs = {
        tuple(sorted((name, other)))
        for name, imported in graph.items()
        for other in imported
        if name in graph.get(other, set()) and not other.startswith(f"{name}.")
    }
    assert not pairs, f"modules importing each other: {sorted(pairs)}"


def test_the_daemon_never_imports_torch():
    code = (
        "import sys, agent.app, agent.cli, agent.model.link;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers')))"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert completed.stdout.strip() == "[]"
