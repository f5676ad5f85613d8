"""The longest classes and functions in mmstory (lines, from `def`/`class` to the end of its body).

    python scripts/class_sizes.py [--top N]
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sizes(kind: type) -> list[tuple[int, str]]:
    found = []
    for path in sorted((ROOT / "mmstory").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, kind):
                found.append((node.end_lineno - node.lineno + 1, f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"))
    return sorted(found, reverse=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args()
    for title, kind in (("classes", ast.ClassDef), ("functions", (ast.FunctionDef, ast.AsyncFunctionDef))):
        print(f"longest {title}:")
        for lines, name in sizes(kind)[: args.top]:
            print(f"  {lines:4d}  {name}")


if __name__ == "__main__":
    main()
