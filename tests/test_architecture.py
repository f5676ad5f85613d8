"""The package's shape: the library imports none of its harnesses' extras, and no two modules import each other.

    python tests/test_architecture.py     # prints the import graph's cycles (none) and what `import` loads
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mmstory"
# what only the [serve], [train] and [eval] extras bring
HARNESS_MODULES = ("gradio", "fastapi", "uvicorn", "accelerate", "pycocoevalcap", "matplotlib", "tensorboard",
                   "webdataset")
HARNESS_PACKAGES = ("mmstory.train", "mmstory.eval", "mmstory.serve")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, known: set[str]) -> set[str]:
    """The mmstory modules a file imports anywhere: at the top, deferred inside a function or under
    `if TYPE_CHECKING:` (an import that closes a circle is still a circle when it is deferred or typing-only: the
    two modules still know each other's insides, and only the order of loading hides it)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # a relative import
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(path, set(mods)) for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    assert cycles(import_graph()) == []


def test_the_library_never_imports_its_harnesses():
    graph = import_graph()
    library = [m for m in graph if not m.startswith(HARNESS_PACKAGES) and m != "mmstory.cli"]
    crossing = {m: sorted(t for t in graph[m] if t.startswith(HARNESS_PACKAGES)) for m in library}
    assert {m: t for m, t in crossing.items() if t} == {}


def _loaded(code: str) -> list[str]:
    check = f"{code}\nimport json, sys\nprint(json.dumps([m for m in {HARNESS_MODULES!r} if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", ["mmstory", "mmstory.generation"])
def test_telling_a_story_imports_no_harness_extra(module):
    assert _loaded(f"import {module}") == []


if __name__ == "__main__":
    graph = import_graph()
    print("cycles:", cycles(graph) or "none")
    for module in ("mmstory", "mmstory.generation"):
        print(f"import {module} loads:", _loaded(f"import {module}") or "none of " + ", ".join(HARNESS_MODULES))
