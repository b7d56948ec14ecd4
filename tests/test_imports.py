"""The package's import graph: no cycles, and the layers point one way (tools -> model -> pipeline).

Every `import`/`from ... import` statement of every module is read with `ast`, including the ones
inside functions (a deferred import still ties the two modules together), and so is every
"alexnet_fast.module:attribute" string (the CLI loads its subcommands by such names through
importlib), so this fails on a cycle that only shows once some function runs. Run alone: `python -m pytest -q tests/test_imports.py`.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = {"pipeline": "alexnet_fast.pipeline", "model": "alexnet_fast.model", "tools": "alexnet_fast.tools"}
LAYER = {"alexnet_fast.pipeline": 0, "alexnet_fast.model": 1, "alexnet_fast.tools": 2}


def _modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGE_DIRS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join((package, *parts))
            found[name.removesuffix(".__init__")] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The package modules `name` imports, resolved to module names (a `from pkg import mod`
    counts as importing pkg.mod when that is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and ":" in node.value \
                and node.value.partition(":")[0] in MODULES:
            targets = [node.value.partition(":")[0]]    # "module:attribute", loaded with importlib (cli.py)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:      # `import a.b.c` of a non-module attribute
                target = target.rpartition(".")[0]
            if target and target != name and target.startswith("alexnet_fast."):
                if not (MODULES[target].name == "__init__.py" and name.startswith(target + ".")):
                    out.add(target)
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(module: str) -> int:
    return next(layer for package, layer in LAYER.items() if module == package or module.startswith(package + "."))


def test_the_graph_was_read():
    # a parser that saw nothing would pass every other test here
    assert "alexnet_fast.model.train" in GRAPH and "alexnet_fast.model.loop" in GRAPH["alexnet_fast.model.train"]
    assert "alexnet_fast.pipeline.loader_spec" in GRAPH["alexnet_fast.model.runtime"]   # a deferred import
    assert "alexnet_fast.tools.cmd_train" in GRAPH["alexnet_fast.tools.cli"]           # loaded by name


def test_no_import_cycles():
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(GRAPH[node]):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack)
        stack.pop()
        state[node] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_layers_point_one_way(module):
    """tools may import model and pipeline, model may import pipeline, pipeline neither."""
    upward = sorted(t for t in GRAPH[module] if _layer(t) > _layer(module))
    assert not upward, f"{module} imports a higher layer: {upward}"


def test_model_imports_no_click():
    users = [m for m, path in MODULES.items() if m.startswith("alexnet_fast.model")
             and any(isinstance(n, (ast.Import, ast.ImportFrom)) and "click" in
                     ([a.name for a in n.names] if isinstance(n, ast.Import) else [n.module or ""])
                     for n in ast.walk(ast.parse(path.read_text())))]
    assert not users, f"click is the command line's business (tools/), imported by {users}"
