"""The dependency order, read from the source with `ast`: every project import points down.

    cli, configs -> tokenizer -> layers, data -> moe, cross_entropy -> model -> sharding
        -> checkpoint, optimizer -> runs -> train, sample, evaluate -> tools (bench, benchmarks/, corpus)

A module imports only modules of a lower rank, so there is no cycle, no library module imports a
tool, and sample.py imports neither train nor bench. Function-level imports count too. A new
module needs a rank here: that is where its place in the layering is decided.
"""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RANKS = {
    "cli": 0, "configs": 0,
    "tokenizer": 0.5,   # imported by data, tasks, hf_files and the entry points
    "layers": 1, "data": 1, "sampling": 1,
    "moe": 1.5,     # imports layers; imported by model and the twin
    "cross_entropy": 1.5,  # imports layers; imported by model
    "parameters": 1.75,   # ParamSpec and the sublayers' specs: imported by model
    "model": 2, "torch/model": 2,
    "quantize": 2.5,   # int8 weights: imported by sample and the decode benchmark
    "sharding": 3,
    "checkpoint": 4, "optimizer": 4, "plot": 4, "tasks": 4,
    "speculative": 4.5,   # imported by sample
    "runs": 4.5,   # a trained run's config and parameters: imported by train, sample, evaluate, hf
    "train": 5, "sample": 5, "evaluate": 5, "torch/train": 5, "hf_files": 5,
    "corpus": 6, "bench": 6, "benchmarks": 6, "ablate": 6, "hf": 6,
    "studies": 7,   # study files: data for ablate.py
}
TOOLS = 6   # and above


def source_files() -> dict[str, Path]:
    """Module key -> file, for every project file outside tests/ (packages keyed by their folder)."""
    files = {}
    for path in sorted(REPO.glob("*.py")) + sorted(REPO.glob("*/*.py")):
        rel = path.relative_to(REPO)
        if rel.parts[0] in ("tests", ".venv") or rel.parts[0].startswith("."):
            continue
        key = rel.parts[0] if rel.parts[0] in ("configs", "benchmarks", "studies") else str(rel.with_suffix(""))
        files.setdefault(key, []).append(path)
    return files


def project_imports(path: Path, modules: set) -> set[str]:
    """Project modules that `path` imports, at any depth of the file. `torch` is PyTorch: the
    twin's folder is loaded by path, never imported as a package."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        found |= {name.split(".")[0] for name in names if name.split(".")[0] in modules}
    return found


def graph() -> dict[str, set[str]]:
    files = source_files()
    modules = {key.split("/")[0] for key in files} - {"torch"}
    return {key: set().union(*(project_imports(p, modules) for p in paths)) - {key}
            for key, paths in files.items()}


def test_every_module_has_a_rank():
    unranked = sorted(set(graph()) - set(RANKS))
    assert not unranked, f"give these modules a rank in tests/test_imports.py: {unranked}"


def test_imports_point_down():
    edges = graph()
    bad = [f"{module} (rank {RANKS[module]}) imports {dep} (rank {RANKS[dep]})"
           for module, deps in edges.items() for dep in sorted(deps)
           if RANKS[dep] >= RANKS[module] and not (module == "bench" and dep == "benchmarks")]
    assert not bad, "imports that point up or sideways: " + "; ".join(bad)


def test_no_cycle():
    edges = graph()
    done, active = set(), []

    def visit(module):
        if module in active:
            raise AssertionError("import cycle: " + " -> ".join(active[active.index(module):] + [module]))
        if module in done:
            return
        active.append(module)
        for dep in edges.get(module, ()):
            visit(dep)
        active.pop()
        done.add(module)
    for module in edges:
        visit(module)


@pytest.mark.parametrize("module, forbidden", [
    ("sample", {"train", "bench", "benchmarks"}),
    ("data", {"bench", "benchmarks", "train", "corpus"}),
    ("checkpoint", {"train", "optimizer"}),
])
def test_named_edges_are_absent(module, forbidden):
    assert not graph()[module] & forbidden


def test_library_modules_never_import_a_tool():
    edges = graph()
    tools = {module for module, rank in RANKS.items() if rank >= TOOLS}
    for module, deps in edges.items():
        if RANKS[module] < TOOLS:
            assert not deps & tools, f"{module} imports the tool(s) {sorted(deps & tools)}"
