"""The package's import graph from its source: prints every import cycle between modules
(exit status 1 if there is one) and which modules import the reference.

The compiled and generated modules (_C, _cuda, _build_info) are leaves. A
`from package import name` counts as an import of the submodule `package.name` when
there is one, otherwise of the package; the implicit import of a module's parent packages
is not counted (Python always does it, and it is not a dependency of the module's code).

    python tools/import_graph.py [python/bspf_ext]
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path


# Built by CMake, so absent from the source tree; they import nothing of the package.
BUILT_MODULES = ("_C", "_cuda", "_build_info")


def module_files(root: Path) -> dict:
    modules = {f"{root.name}.{name}": None for name in BUILT_MODULES}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def import_graph(modules: dict) -> dict:
    graph = defaultdict(set)
    for name, path in modules.items():
        if path is None:
            continue
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    child = f"{target}.{alias.name}"
                    graph[name].add(child if child in modules else target)
            elif isinstance(node, ast.Import):
                graph[name].update(alias.name for alias in node.names)
        graph[name] = {m for m in graph[name] if m in modules and m != name}
    return graph


def cycles(graph: dict, modules: dict) -> list:
    state, stack, found = {}, [], []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                found.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(modules):
        if module not in state:
            visit(module)
    return found


def main(argv) -> int:
    root = Path(argv[1] if len(argv) > 1 else Path(__file__).parents[1] / "python" / "bspf_ext")
    modules = module_files(root)
    graph = import_graph(modules)
    loops = cycles(graph, modules)
    for loop in loops:
        print("cycle:", " -> ".join(loop))
    reference = f"{root.name}.reference"
    print("modules importing the reference:", sorted(m for m in graph if reference in graph[m]) or "none")
    return 1 if loops else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
