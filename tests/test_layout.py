"""The package layout: stage packages named in docs/layout.md, no import hook, no import cycles."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import seqpg

SRC = Path(seqpg.__file__).parent


def test_seqpg_modules_import_by_their_own_names_only():
    """No import hook, no module that re-exports another's names under an old path."""
    import sys

    assert not any(type(f).__module__.startswith("seqpg") for f in sys.meta_path)
    for old in ("seqpg.trainer", "seqpg.sampling", "seqpg.training.checkpoint", "seqpg.bench"):
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(old)


def _imports(path: Path) -> set[str]:
    """seqpg modules ``path`` imports at module level or in functions (relative imports resolved)."""
    mod = ".".join(path.relative_to(SRC.parent).with_suffix("").parts)
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    if path.name == "__init__.py":
        mod = pkg
    out = set()
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and getattr(block.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(block)}
    for node in ast.walk(tree):
        if id(node) in typing_only:  # annotations only: not an import when the program runs
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.startswith("seqpg"):
                out.add(name)
                out |= {f"{name}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("seqpg")}
    return out


def test_no_import_cycles_between_modules():
    modules = {".".join(p.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__"): p
               for p in SRC.rglob("*.py")}
    graph = {m: {i for i in _imports(p) if i in modules and i != m and not m.startswith(i + ".")
                 and not i.startswith(m + ".")} for m, p in modules.items()}
    seen, stack, cycles = set(), [], []

    def visit(m):
        if m in stack:
            cycles.append(stack[stack.index(m):] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        stack.append(m)
        for n in sorted(graph[m]):
            visit(n)
        stack.pop()

    for m in sorted(graph):
        visit(m)
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_core_imports_nothing_else_of_seqpg():
    for p in (SRC / "core").rglob("*.py"):
        assert all(i.startswith("seqpg.core") for i in _imports(p)), p


def test_the_code_layout_names_every_module_and_nothing_gone():
    readme = (SRC.parent.parent / "docs" / "layout.md").read_text()
    block = readme.split("```", 2)[1]
    named, folder_stack = set(), []
    for line in block.splitlines()[2:]:
        indent = len(line) - len(line.lstrip())
        words = line.split()
        if not words:
            continue
        depth = (indent - 2) // 2
        folder_stack = folder_stack[:depth]
        if words[0].endswith("/"):
            folder_stack.append(words[0])
            named.add("".join(folder_stack))
            continue
        for w in words:
            if w.endswith(".py"):
                named.add("".join(folder_stack) + w)
            else:
                break
    modules = {p.relative_to(SRC).as_posix() for p in SRC.rglob("*.py")
               if p.name not in ("__init__.py", "__main__.py") and "bench/" not in p.relative_to(SRC).as_posix()}
    assert sorted(modules - named) == [], "modules missing from docs/layout.md"
    gone = sorted(n for n in named if not (SRC / n).exists())
    assert gone == [], "docs/layout.md names what does not exist"
