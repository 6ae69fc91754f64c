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
