"""The package's imports point one way: no module imports one that imports it back, not even
through an import inside a function (a circle that works only because of where its imports
stand breaks when one moves)."""

from __future__ import annotations

import ast

from .conftest import ROOT


def _modules() -> dict[str, object]:
    out = {}
    for path in (ROOT / "iterate").rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def imports(modules: dict) -> dict[str, set[str]]:
    """Each module's imports of the package's modules, wherever in the module they stand."""

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {resolve(a.name) for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                # ``from pkg import sub`` runs ``pkg`` (its __init__) as well as ``sub``
                found.add(resolve(node.module))
                found |= {resolve(f"{node.module}.{a.name}") for a in node.names}
        edges[name] = {m for m in found if m and m != name}
    return edges


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while (w := stack.pop()) != v:
                group.append(w)
            if group:
                out.append(sorted([v, *group]))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_module_imports_one_that_imports_it_back():
    edges = imports(_modules())
    assert len(edges) > 80 and "iterate.rewards.kinds" in edges["iterate.rewards"]
    assert not circles(edges), "import circles: " + "; ".join(
        " <-> ".join(c) for c in circles(edges)
    )
    # the walk finds a circle where there is one, through a function's import too
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_packages_import_one_way():
    """Taken a package (or a top-level module) at a time, the imports point one way too:
    no package imports one that imports it back; the run-folder contract (``store``) and the
    training parts (``train``) import no package above them, and the command line and the
    loop (``run``) are imported by nothing but the entry point and the benchmarks."""
    edges = imports(_modules())

    def unit(name: str) -> str:
        parts = name.split(".")
        return parts[1] if len(parts) > 1 else "iterate"

    packages: dict[str, set[str]] = {}
    for a, found in edges.items():
        packages.setdefault(unit(a), set()).update(unit(b) for b in found if unit(b) != unit(a))
    assert {"store", "train", "run", "sampling", "stages", "rewards", "report"} <= set(packages)
    assert not circles(packages), "package circles: " + "; ".join(
        " <-> ".join(c) for c in circles(packages)
    )
    above = {"run", "stages", "report", "rewards", "sampling", "bench", "toy", "instruct"}
    assert not packages["store"] & above and not packages["train"] & above
    assert {p for p, found in packages.items() if "run" in found} <= {"__main__", "bench"}
