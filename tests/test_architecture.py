"""The layer rule of docs/architecture.md, checked on the source: imports point one way
(consumers -> library API -> backends -> runtime -> plain values) and form no cycle.

Imports are read with `ast`, function-level ones included (a lazy import is still a
dependency), so a new cycle or an upward import fails here, not in a user's traceback.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "toolbox"

# Lowest first. A module belongs to the first layer with a matching prefix (exact name or
# name + "."); each may import its own layer and the layers below, never one above.
LAYERS = [
    ("values", ["toolbox.errors", "toolbox.types", "toolbox.config", "toolbox.registry", "toolbox.tokenizer",
                "toolbox.hf_tokenizer", "toolbox.prompts", "toolbox.streaming", "toolbox.textio",
                "toolbox.byteinspect", "toolbox.forkpool", "toolbox.hookspecs", "toolbox.params", "toolbox.context",
                "toolbox.results", "toolbox.scoring", "toolbox.batching", "toolbox.backend"]),
    ("runtime", ["toolbox.runtime"]),
    ("backends", ["toolbox.backends", "toolbox.plugins", "toolbox.builtin_models", "toolbox.checkpoints"]),
    ("library", ["toolbox.api", "toolbox.batchjob", "toolbox.likelihood", "toolbox.heads", "toolbox"]),
    ("consumers", ["toolbox.cli", "toolbox.clidoc", "toolbox.__main__", "toolbox.commands", "toolbox.serving",
                   "toolbox.eval", "toolbox.finetune", "toolbox.ray"]),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def layer(name: str) -> int:
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if prefix == "toolbox" and name != "toolbox":
                continue
            if name == prefix or name.startswith(prefix + "."):
                return i
    raise AssertionError(f"{name} is in no layer: add it to LAYERS (and to docs/architecture.md)")


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The toolbox modules `name` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            # `from pkg import mod` depends on pkg.mod; `from mod import name` on mod
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports(name, path, known) for name, path in mods.items()}


def test_imports_point_down_the_layers():
    wrong = []
    for name, deps in graph().items():
        for dep in deps:
            if dep == "toolbox":  # the package itself: only its version and error type are imported
                continue
            if layer(dep) > layer(name):
                wrong.append(f"{name} ({LAYERS[layer(name)][0]}) imports {dep} ({LAYERS[layer(dep)][0]})")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycles():
    g = graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []
    counter = [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in g.get(v, ()):
            if w not in g:
                continue
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
                cycles.append(sorted(component))

    for v in g:
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_the_rule_catches_a_violation(tmp_path):
    """The checker itself: an upward import and a cycle, written to a scratch file, are found."""
    path = tmp_path / "loaded.py"
    path.write_text("from toolbox.api import load\nfrom . import model\n")
    found = imports("toolbox.runtime.loaded", path, {"toolbox.api", "toolbox.runtime.model", "toolbox.runtime"})
    assert found == {"toolbox.api", "toolbox.runtime.model"}
    assert layer("toolbox.api") > layer("toolbox.runtime.loaded")
