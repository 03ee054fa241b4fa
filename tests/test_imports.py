"""The project's import graph (read by densevse.pipeline.code: every import, at module level and inside
functions): no cycles; the layers import downwards only, models/ (library) <- stages/ <- pipeline/ <- cluster/
(bench/ on top); and pyproject.toml installs every package under the one `densevse` namespace."""
from __future__ import annotations

import tomllib

from densevse.pipeline.code import NAMESPACE, PACKAGES, ROOT, closure, graph, imports_of, project_modules

LAYERS = {pkg: i for i, pkg in enumerate(PACKAGES)}  # models 0 < stages 1 < pipeline 2 < cluster 3


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(g[v]):
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

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def layer(module: str) -> int:
    return LAYERS[module.split(".")[1]]


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    g = graph()
    assert {"densevse.pipeline.config", "densevse.stages.base", "densevse.models.batch",
            "densevse.pipeline.jobs", "densevse.cluster.local"} <= set(g)
    assert "densevse.models.batch" in g["densevse.pipeline.serving.embedder"]  # the edges are really read
    found = cycles(g)
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def folder(module: str) -> str:
    """A module's step: its folder under pipeline/ (pipeline.training, pipeline.search, ...); pipeline's own
    files (config, storage, trained, ship, ...) and the other packages stand as themselves."""
    parts = module.split(".")
    return ".".join(parts[:3]) if parts[1] == "pipeline" and len(parts) > 3 else module


def test_no_cycles_between_steps():
    """No two steps of pipeline/ import each other, directly or round a loop: a step's folder is one unit
    (training/ once imported evaluation/ and tracking/, which read its best models back from it; the serving
    model imported preprocess/'s model shipping: both helpers now stand in pipeline/ itself)."""
    g: dict[str, set[str]] = {}
    for name, deps in graph().items():
        g.setdefault(folder(name), set()).update(folder(d) for d in deps if folder(d) != folder(name))
    for deps in list(g.values()):
        for d in deps:
            g.setdefault(d, set())
    assert {"densevse.pipeline.training", "densevse.pipeline.evaluation"} <= set(g)
    found = cycles(g)
    assert not found, "steps importing each other: " + "; ".join(" <-> ".join(c) for c in found)


def test_layers_import_downwards_only():
    """models/ imports nothing of the project's above it, stages/ nothing of pipeline/ or cluster/, pipeline/
    nothing of cluster/ (the README's "layers import downwards only")."""
    mods = project_modules()
    bad = [f"{name} -> {t}" for name, path in mods.items() for t in imports_of(path, name, set(mods))
           if layer(t) > layer(name)]
    assert not bad, bad


def test_the_checks_fail_on_an_upward_import_and_a_cycle(tmp_path):
    """What the two tests above read really catches a climbing import (pipeline -> cluster, as cli/cluster.py
    and cluster/jobs.py once made a cycle: job submission is pipeline/jobs.py now)."""
    mod = tmp_path / "x.py"
    mod.write_text("def f():\n    from densevse.cluster.local import local_cluster\n")
    known = set(project_modules())
    assert imports_of(mod, "densevse.pipeline.cli.x", known) == {"densevse.cluster.local"}
    assert layer("densevse.cluster.local") > layer("densevse.pipeline.cli.x")
    assert cycles({"a": {"b"}, "b": {"a"}}) == [["a", "b"]]
    assert folder("densevse.pipeline.training.loop") == "densevse.pipeline.training"
    assert folder("densevse.pipeline.trained") == "densevse.pipeline.trained"


def test_every_package_is_installed_under_the_namespace():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    on_disk = {".".join([NAMESPACE, *p.parent.relative_to(ROOT).parts]) for pkg in PACKAGES
               for p in (ROOT / pkg).rglob("__init__.py")}
    assert listed == on_disk
    assert cfg["package-dir"] == {f"{NAMESPACE}.{p}": p for p in PACKAGES}


def test_a_registered_model_ships_only_what_loading_it_imports():
    needed = closure(["densevse.pipeline.serving.embedding_model"])
    assert "densevse.pipeline.serving.pyfunc" in needed and "densevse.models.hmlstm" in needed
    assert not any(m.startswith(("densevse.pipeline.training", "densevse.pipeline.cli", "densevse.cluster",
                                 "densevse.pipeline.search")) for m in needed)
