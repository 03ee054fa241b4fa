"""The project's own code as a graph of imports, read with `ast` (nothing is imported or run).

Two users: a registered model ships only the modules that loading it needs (`ship`: the import closure of its
models-from-code file), and tests/test_imports.py checks the graph (no cycles; layers import downwards only).

Every import counts, at module level and inside functions: an import inside a function still ties the two
modules together, it only hides the tie until that function runs. `from a.b import c` is an edge to the module
a.b.c when that is a module, else to a.b.
"""
from __future__ import annotations

import ast
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the folder holding models/, stages/, pipeline/, cluster/
NAMESPACE = "densevse"  # every package is imported as densevse.<folder> (pyproject.toml)
PACKAGES = ("models", "stages", "pipeline", "cluster")


def module_name(path: Path) -> str:
    """densevse.<dotted path> of a source file of the project."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join([NAMESPACE, *(parts[:-1] if parts[-1] == "__init__" else parts)])


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules `path` (module `name`) imports anywhere in its body."""
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


def graph() -> dict[str, set[str]]:
    """module -> the project modules it imports."""
    mods = project_modules()
    return {name: imports_of(path, name, set(mods)) for name, path in mods.items()}


def closure(entries: list[str], g: dict[str, set[str]] | None = None) -> set[str]:
    """The modules `entries` reach through imports (themselves and the packages that hold them included: a
    package's __init__ runs before its modules)."""
    g = g or graph()
    seen, todo = set(), list(entries)
    while todo:
        m = todo.pop()
        if m in seen or m not in g:
            continue
        seen.add(m)
        todo += g[m]
        parts = m.split(".")
        todo += [".".join(parts[:i]) for i in range(2, len(parts))]  # densevse.pipeline, densevse.pipeline.x ...
    return seen


def ship(entries: list[str], dest: Path) -> Path:
    """Copy the source files of closure(entries) into dest/densevse/..., as laid out when installed; returns
    dest/densevse (what MLflow's code_paths takes: it puts the folder holding it first on sys.path)."""
    mods = project_modules()
    for m in sorted(closure(entries)):
        src = mods[m]
        target = dest / NAMESPACE / src.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
    return dest / NAMESPACE
