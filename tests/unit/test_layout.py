"""The package's layers (core <- distributed <- training) and where imports may sit."""

from __future__ import annotations

import ast
from pathlib import Path

import dude_dist

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "dude_dist"


def _imports(path: Path) -> tuple[set[str], list[tuple[int, str, str]]]:
    """(package modules and ``torch.distributed`` imported at module level, imports inside functions
    as ``(line, function, module)``)."""
    tree = ast.parse(path.read_text())
    top: set[str] = set()
    for node in tree.body:
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = ([f"dude_dist.{a.name}" for a in node.names] if node.module == "dude_dist" else [node.module])
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            if name.startswith("dude_dist."):
                top.add(name.split(".")[1])
            elif name.startswith("torch.distributed"):
                top.add("torch.distributed")
    inner = []
    for func in ast.walk(tree):
        if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(func):
                if isinstance(node, ast.Import):
                    inner += [(node.lineno, func.name, a.name) for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    inner.append((node.lineno, func.name, node.module or ""))
    return top, inner


def _layer_of(module: str) -> int:
    for level, members in enumerate(dude_dist.LAYERS.values()):
        if module in members:
            return level
    raise AssertionError(f"dude_dist/{module}.py is in no layer of dude_dist.LAYERS")


def test_every_module_is_in_one_layer_and_imports_only_its_own_layer_or_below():
    listed = [m for members in dude_dist.LAYERS.values() for m in members]
    assert len(listed) == len(set(listed)), "a module is listed in two layers"
    upward = []
    for path in sorted(PACKAGE.glob("*.py")):
        if path.stem == "__init__":
            continue
        level = _layer_of(path.stem)
        top, _ = _imports(path)
        for dep in top - {"torch.distributed"}:
            if _layer_of(dep) > level:
                upward.append(f"{path.stem} ({list(dude_dist.LAYERS)[level]}) imports {dep}")
        if level == 0 and "torch.distributed" in top:
            upward.append(f"{path.stem} (core) imports torch.distributed")
    assert not upward, upward


def test_the_layer_and_init_modules_know_nothing_of_process_groups():
    """dude.py, svd_init.py and adapters.py import (transitively) neither comm, distributed,
    sharded_init, zero nor torch.distributed: the layer can be used without a process group."""
    closure: set[str] = set()
    todo = ["dude", "svd_init", "adapters"]
    while todo:
        mod = todo.pop()
        if mod in closure:
            continue
        closure.add(mod)
        todo += [d for d in _imports(PACKAGE / f"{mod}.py")[0] if d != "torch.distributed"]
        assert "torch.distributed" not in _imports(PACKAGE / f"{mod}.py")[0], mod
    assert closure.isdisjoint({"comm", "distributed", "sharded_init", "zero", "failures"}), closure


def test_imports_inside_functions_are_only_the_heavy_optional_libraries():
    """Standard library, torch, safetensors, psutil and the package's own modules are imported
    at the top; only libraries that are slow to import or optional are imported where used,
    so ``plan.py`` and a config error answer in a second without loading DeepSpeed."""
    found = []
    for path in sorted(PACKAGE.glob("*.py")):
        for line, func, module in _imports(path)[1]:
            if module.split(".")[0] in dude_dist.LAZY_IMPORTS or module in dude_dist.LAZY_IMPORTS:
                continue
            if (path.stem, func, module) == ("config", "__getattr__", "dude_dist"):
                continue  # the loader imports the schema; the old import path resolves on use
            found.append(f"dude_dist/{path.name}:{line} in {func}(): {module}")
    assert not found, found


def test_no_import_cycle_among_the_modules():
    """Every module can be imported first (the imports at module level form no cycle)."""
    graph = {p.stem: _imports(p)[0] - {"torch.distributed"} for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    state: dict[str, int] = {}

    def visit(mod: str, path: list[str]) -> None:
        if state.get(mod) == 2:
            return
        assert state.get(mod) != 1, " -> ".join(path[path.index(mod):] + [mod])
        state[mod] = 1
        for dep in sorted(graph[mod]):
            visit(dep, path + [mod])
        state[mod] = 2

    for mod in sorted(graph):
        visit(mod, [])
