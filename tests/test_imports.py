"""No import cycles among the project's modules.

Every import is read with `ast`, at module level and inside functions (an import inside a function still ties
the two modules together; it only hides the cycle until that function runs). `from a.b import c` is an edge
to the module a.b.c when that is a module, else to a.b. The project's layers: models/ (library) <- stages/
<- pipeline/ <- cluster/, and bench/ on top.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "stages", "pipeline", "cluster")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules `path` imports anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        out.update(t for t in targets if t in known and t != name)
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    mods = project_modules()
    assert {"pipeline.config", "stages.base", "models.batch", "cluster.jobs"} <= set(mods)
    graph = {name: imports_of(path, name, set(mods)) for name, path in mods.items()}
    assert "models.batch" in graph["pipeline.training.data"]  # the edges are really read
    found = cycles(graph)
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_library_does_not_import_orchestration():
    """models/ is the library: it imports nothing from stages/, pipeline/ or cluster/; stages/ nothing from
    pipeline/ or cluster/."""
    mods = project_modules()
    bad = []
    for name, path in mods.items():
        layer = name.split(".")[0]
        above = {"models": ("stages", "pipeline", "cluster"), "stages": ("pipeline", "cluster")}.get(layer, ())
        bad += [f"{name} -> {t}" for t in imports_of(path, name, set(mods)) if t.split(".")[0] in above]
    assert not bad, bad
