"""The package's shape, as docs/design.md draws it: no import cycle, the reference used
only by tests, benchmarks and what times it, and no long source file without a reason."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import import_graph  # noqa: E402  (tools/import_graph.py)

PACKAGE = ROOT / "python" / "bspf_ext"
LONG = 600  # lines


def test_no_import_cycle():
    modules = import_graph.module_files(PACKAGE)
    graph = import_graph.import_graph(modules)
    assert import_graph.cycles(graph, modules) == []


def test_the_reference_is_imported_only_by_what_times_it():
    modules = import_graph.module_files(PACKAGE)
    graph = import_graph.import_graph(modules)
    importers = sorted(m for m in graph if "bspf_ext.reference" in graph[m])
    assert importers == ["bspf_ext.app.bench"]


def test_the_library_does_not_import_the_application():
    modules = import_graph.module_files(PACKAGE)
    graph = import_graph.import_graph(modules)
    # bspf_ext.__main__ is `python -m bspf_ext`, the command's other door.
    library = [m for m in graph if not m.startswith("bspf_ext.app") and m != "bspf_ext.__main__"]
    reaching = {m: sorted(t for t in graph[m] if t.startswith("bspf_ext.app")) for m in library}
    assert {m: t for m, t in reaching.items() if t} == {}


def test_long_source_files_say_why():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    suffixes = {".py", ".cpp", ".h", ".cu", ".cuh", ".sh", ".cmake"}
    unexplained = []
    for name in tracked.split():
        path = ROOT / name
        if path.suffix not in suffixes or not path.is_file():
            continue
        lines = path.read_text(errors="replace").splitlines()
        if len(lines) > LONG and not any("Why one long file" in line for line in lines[:30]):
            unexplained.append(f"{name} ({len(lines)} lines)")
    assert unexplained == [], f"over {LONG} lines without 'Why one long file' in the first 30 lines"
