"""Cache keys that name everything that makes an artefact: its config, the source of the code
that makes it, and the versions of the libraries that compute it (and the CPU's instruction
set their kernels use).

The code is a module and every ``iterate`` module it imports, transitively (read from the
source, imports inside functions included), plus the shipped chat templates. So an edited
training loop makes a new toy world or reward model instead of reusing one that this code
no longer makes, and a figure measured from a cache is one a fresh clone gets too.
"""

from __future__ import annotations

import ast
import hashlib
import json
from importlib import metadata
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent  # iterate/
LIBRARIES = ("torch", "transformers", "tokenizers", "peft", "safetensors")


def _file(module: str) -> Path | None:
    """``iterate.toy.build`` -> iterate/toy/build.py (or a package's ``__init__.py``)."""
    parts = module.split(".")
    if parts[0] != PACKAGE.name:
        return None
    base = PACKAGE.joinpath(*parts[1:])
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def _imports(module: str, path: Path) -> set[str]:
    """The modules ``path`` imports, by absolute name (relative imports resolved)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, *([base] if base else [])])
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}  # `from pkg import module`
    return out


def sources(*modules: str) -> list[Path]:
    """The files of ``modules`` and of every package module they import, transitively."""
    seen: dict[str, Path] = {}
    todo = list(modules)
    while todo:
        name = todo.pop()
        path = _file(name)
        if path is None or name in seen:
            continue
        seen[name] = path
        todo += sorted(_imports(name, path))
    templates = sorted((PACKAGE / "templates").glob("*"))
    return sorted(set(seen.values())) + templates


def code_hash(*modules: str) -> str:
    h = hashlib.sha256()
    for p in sources(*modules):
        h.update(str(p.relative_to(PACKAGE)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def versions() -> dict[str, str | None]:
    """The libraries' versions, and the instruction set torch's CPU kernels use: an AVX2 and
    an AVX-512 machine round differently, and a long training amplifies it."""
    import torch

    out = {"cpu_capability": torch.backends.cpu.get_cpu_capability()}
    for lib in LIBRARIES:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            out[lib] = None
    return out


def key(config: dict, *modules: str) -> str:
    """The cache key of an artefact made from ``config`` by ``modules``' code."""
    made = {"config": config, "code": code_hash(*modules), "libraries": versions()}
    return hashlib.sha1(json.dumps(made, sort_keys=True, default=str).encode()).hexdigest()[:12]
