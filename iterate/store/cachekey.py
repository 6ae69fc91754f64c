"""Cache keys that name everything that makes an artefact: its config, the source of the code
that makes it, and the versions of the libraries that compute it (and the CPU's instruction
set their kernels use).

The code is a module and every ``iterate`` module it imports, transitively (read from the
source, imports inside functions included), plus the shipped chat templates. So an edited
training loop makes a new toy world or reward model instead of reusing one that this code
no longer makes, and a figure measured from a cache is one a fresh clone gets too.

``cached`` makes such an artefact's folder once, whole, and checks it before each reuse.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import shutil
import time
from importlib import metadata
from pathlib import Path

from iterate.errors import BadInput
from iterate.store.shards import atomic_write_json, clean_temporaries, read_json, write_folder

log = logging.getLogger(__name__)

PACKAGE = Path(__file__).resolve().parents[1]  # iterate/
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


def cached(out: Path, what: str, make, summary=lambda info: "", key: str | None = None) -> Path:
    """``out``, made by ``make(folder) -> info`` once, whole or not at all (the one folder
    writer, ``shards.write_folder``: built under a temporary name, ``world.json`` written
    last with every file's checksum, then renamed into place; another process's folder
    that got there first is kept). A cached folder is checked against those checksums
    before each reuse and built again when damaged, or when ``key`` (the cache key of a
    folder whose name does not carry it) differs from the one it was built under; a build
    cut short (its temporary folder) is cleaned by the next."""
    if (out / "world.json").exists():
        problem = _damaged(out, key)
        if problem is None:
            return out
        log.warning("%s: %s: building it again", out, problem)
        shutil.rmtree(out, ignore_errors=True)
    clean_temporaries(out.parent)
    t0 = time.time()
    log.info("building %s into %s (once; later runs reuse it)", what, out)

    def fill(tmp: Path) -> dict:
        info = make(tmp)
        info["build_seconds"] = round(time.time() - t0, 1)
        info["files"] = {
            str(p.relative_to(tmp)): file_hash(p) for p in sorted(tmp.rglob("*")) if p.is_file()
        }
        if key is not None:
            info["key"] = key
        atomic_write_json(tmp / "world.json", info)
        return info

    info = write_folder(out, fill)
    log.info("%s ready in %.0fs: %s", what, info["build_seconds"], summary(info))
    return out


def _damaged(out: Path, key: str | None = None) -> str | None:
    """What is wrong with a cached folder, checked against the checksums its ``world.json``
    recorded (``files``; the model's and tokenizer's alone in folders built before) and the
    key it was built under, or ``None``."""
    try:
        info = read_json(out / "world.json")
    except BadInput:
        return "its world.json is damaged"
    if key is not None and info.get("key") != key:
        return f"built under cache key {info.get('key')}, this code and config make {key}"
    for name, want in (info.get("files") or info.get("hashes") or {}).items():
        if not (out / name).is_file():
            return f"{name} is missing"
        if file_hash(out / name) != want:
            return f"{name} differs from what was built (checksum)"
    return None


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
