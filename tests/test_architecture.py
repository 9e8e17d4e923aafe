"""The package's shape, checked from its source: what imports what, and how big modules get.

DESIGN.md's rules: imports run one way (kernels <- model <- {train, sampling, hf, feedback} <-
online <- cli, with small shared modules at the bottom); train and sampling do not import each
other; no module imports a private (``_name``) from another module; nothing imports cli.py. Every
import counts, including the ones inside functions (a lazy import hides a cycle, it does not
remove it).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "jaxselm"

# Top-level parts of the package a part may NOT import (its "upper" neighbours).
FORBIDDEN = {
    "kernels": {
        "model",
        "train",
        "sampling",
        "hf",
        "feedback",
        "data",
        "online",
        "cli",
        "checkpoints",
    },
    "model": {"train", "sampling", "hf", "feedback", "data", "online", "cli", "checkpoints"},
    "parallel": {"model", "train", "sampling", "hf", "feedback", "data", "online", "cli"},
    "data": {"model", "train", "sampling", "hf", "feedback", "online", "cli", "checkpoints"},
    "train": {"sampling", "hf", "feedback", "online", "cli", "checkpoints"},
    "sampling": {"train", "hf", "feedback", "online", "cli", "checkpoints"},
    "hf": {"train", "sampling", "feedback", "online", "cli", "checkpoints"},
    "feedback": {"train", "sampling", "online", "cli", "checkpoints"},
    "checkpoints": {"online", "cli"},
    "online": {"cli"},
}
BOTTOM = ("errors", "config_base", "config_io", "files", "preemption", "metric_names")
MAX_LINES = 500  # any module outside kernels/ (whose Pallas kernels are one file each, on purpose)
MAX_ORCHESTRATOR_LINES = 300


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports(source: str, name: str, is_package: bool) -> list[tuple[str, list[str]]]:
    """(imported jaxselm module, names taken from it) for every import statement of a module."""
    out = []
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.startswith("jaxselm")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target.startswith("jaxselm"):
                out.append((target, [a.name for a in node.names]))
    return out


def private_imports(source: str, name: str, is_package: bool = False) -> list[str]:
    """Private names (or private modules) this module takes from ANOTHER module."""
    bad = []
    for target, names in imports(source, name, is_package):
        if target == name:
            continue
        if any(part.startswith("_") and part != "__init__" for part in target.split(".")):
            bad.append(target)
        mods = modules()
        for n in names:
            sub = f"{target}.{n}"
            if n.startswith("_") and not n.startswith("__") and sub not in mods:
                bad.append(f"{target}:{n}")
    return bad


def part_of(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        deps = set()
        for target, names in imports(path.read_text(), name, path.name == "__init__.py"):
            for n in names or [None]:
                sub = f"{target}.{n}" if n else target
                deps.add(sub if sub in mods else target)
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def test_the_checker_catches_a_private_import():
    src = "from jaxselm.online.loop import _pack\nfrom jaxselm.kernels.cope._impl import f\n"
    assert private_imports(src, "jaxselm.online.commands") == [
        "jaxselm.online.loop:_pack",
        "jaxselm.kernels.cope._impl",
    ]
    assert private_imports("from jaxselm.model import api\n", "jaxselm.online.x") == []


@pytest.mark.parametrize("name", sorted(modules()))
def test_no_private_imports_across_modules(name):
    path = modules()[name]
    assert private_imports(path.read_text(), name, path.name == "__init__.py") == []


def test_imports_run_one_way():
    bad = []
    for name, deps in import_graph().items():
        part = part_of(name)
        for dep in deps:
            dep_part = part_of(dep)
            if dep_part == "cli" and name != "jaxselm.__main__":
                bad.append(f"{name} -> {dep} (nothing imports cli)")
            elif dep_part in FORBIDDEN.get(part, set()):
                bad.append(f"{name} -> {dep}")
            elif part in BOTTOM and dep_part not in BOTTOM:
                bad.append(f"{name} -> {dep} (a bottom module)")
    assert bad == []


def test_no_import_cycles():
    graph = import_graph()

    # Imports of a package's own __init__ by its submodules are the package itself loading.
    def deps(m):
        return {d for d in graph[m] if not (m.startswith(d + "."))}

    state: dict[str, int] = {}
    cycles = []

    def visit(m, stack):
        state[m] = 1
        for d in sorted(deps(m)):
            if state.get(d) == 1:
                cycles.append(" -> ".join([*stack[stack.index(d) :], d]))
            elif d not in state:
                visit(d, [*stack, d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_module_sizes():
    big = {
        name: n
        for name, p in modules().items()
        if not name.startswith("jaxselm.kernels")
        and (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert big == {}
    assert len((ROOT / "online" / "loop.py").read_text().splitlines()) < MAX_ORCHESTRATOR_LINES
