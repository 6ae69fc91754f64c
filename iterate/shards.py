"""Parquet shards, atomic writes and the ``_DONE.json`` contract of every stage.

- A shard is written to a temporary name in its folder and renamed into place, so a shard
  that exists is complete; readers ignore temporaries.
- ``_DONE.json`` is written last. It records the stage's config (and its hash); a stage
  whose config changed since it ran is refused, naming the differing keys, unless forced.
- Every shard schema is explicit and lives here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from iterate import faults

DONE = "_DONE.json"

log = logging.getLogger(__name__)

SCHEMAS: dict[str, pa.Schema] = {
    "generate": pa.schema(
        [
            ("prompt_id", pa.string()),
            ("sample_idx", pa.int32()),
            ("prompt", pa.string()),
            ("response", pa.string()),
            ("prompt_tokens", pa.int32()),
            ("response_tokens", pa.int32()),
            ("finish_reason", pa.string()),  # stop (EOS) | length (hit max_tokens)
            ("response_ids", pa.list_(pa.int32())),  # the sampled tokens, EOS included
        ]
    ),
    "label": pa.schema(
        [
            ("prompt_id", pa.string()),
            ("sample_idx", pa.int32()),
            ("reward", pa.float64()),
            ("gold", pa.float64()),  # the toy world's gold judge; null elsewhere
            ("reward_std", pa.float64()),  # an ensemble's disagreement; null for one model
        ]
    ),
    "pairs": pa.schema(
        [
            ("prompt_id", pa.string()),
            ("prompt", pa.string()),
            ("chosen", pa.string()),
            ("rejected", pa.string()),  # null for RAFT (best response only)
            ("chosen_idx", pa.int32()),
            ("rejected_idx", pa.int32()),
            ("chosen_reward", pa.float64()),
            ("rejected_reward", pa.float64()),
            ("chosen_ids", pa.list_(pa.int32())),  # the sampled tokens: what the update trains on
            ("rejected_ids", pa.list_(pa.int32())),
        ]
    ),
}


class StageConfigChanged(RuntimeError):
    pass


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(
        path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode()
    )


def read_json(path: Path, default: Any = None) -> Any:
    """A JSON file's content, or ``default`` when there is no such file."""
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else default


def read_jsonl(path: Path) -> list[dict]:
    """A JSON-lines file's objects (``metrics.jsonl``, ``train_log.jsonl``); none when the
    file is not there."""
    path = Path(path)
    return [json.loads(x) for x in path.read_text().splitlines() if x] if path.exists() else []


def write_folder(out: Path, fill, replace: bool = False) -> Any:
    """Make folder ``out`` whole or not at all: ``fill(tmp)`` writes it under a temporary
    name (``TEMPORARY``: a dead writer's is cleaned by the next run), then it is renamed into
    place. A folder already there (another writer's) is kept, unless ``replace``. Returns
    what ``fill`` returned."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    result = fill(tmp)
    if replace:
        shutil.rmtree(out, ignore_errors=True)
    if out.exists():
        shutil.rmtree(tmp)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    return result


def write_shard(table: pa.Table, path: Path) -> None:
    """Write one Parquet shard atomically (temporary name, then ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    pq.write_table(table, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_plan(folder: Path, unit: str, total: int) -> None:
    """Record that a stage set out to write ``total`` ``unit`` (shards, steps) in ``folder``."""
    atomic_write_json(Path(folder) / PLAN, {"unit": unit, "total": total})


def shard_path(folder: Path, index: int) -> Path:
    return Path(folder) / f"shard_{index:05d}.parquet"


def shard_index(path: Path) -> int:
    """``shard_00012.parquet`` -> 12."""
    return int(Path(path).stem.split("_")[1])


def shard_paths(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob("shard_*.parquet"))


def read_shards(folder: Path, schema: pa.Schema | None = None) -> pa.Table:
    paths = shard_paths(folder)
    if not paths:
        if schema is None:
            raise FileNotFoundError(f"no shards in {folder}")
        return schema.empty_table()
    # shards written before a column was added read it as nulls
    return pa.concat_tables([pq.read_table(p) for p in paths], promote_options="default")


def flatten(d: dict, prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """Nested keys joined by ``sep``: ``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + sep, sep))
        else:
            out[key] = v
    return out


def config_hash(cfg: dict) -> str:
    return hashlib.sha1(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:12]


def diff_keys(old: dict, new: dict) -> list[str]:
    a, b = flatten(old), flatten(new)
    return sorted(k for k in a.keys() | b.keys() if a.get(k, "<unset>") != b.get(k, "<unset>"))


def _input_key(folder: Path) -> str:
    return (
        f"{folder.parent.name}/{folder.name}"
        if folder.parent.name.startswith("iter_")
        else folder.name
    )


def done_id(folder: Path) -> str | None:
    """Which output of a finished stage this is: its config hash and a hash of its files'
    checksums (``identity``), so a stage redone with the same output does not invalidate the
    ones after it. Stages recorded by earlier versions: the hash of their files' sizes and
    checksums, or, before checksums were recorded, their finish time."""
    p = Path(folder) / DONE
    if not p.exists():
        return None
    d = json.loads(p.read_text())
    if "identity" in d:
        return d["identity"]
    if "files" in d:
        return f"{d['config_hash']}:{config_hash(d['files'])}"
    return f"{d['config_hash']}@{d['finished_unix']}"


def identity(config: dict, files: dict[str, dict]) -> str:
    """A stage's identity from content only: its config and its files' checksums (canonical
    ones, see ``CANONICAL``; not their sizes, which a canonical file's bytes need not keep)."""
    return f"{config_hash(config)}:{config_hash({k: v['sha256'] for k, v in files.items()})}"


PLAN = "_PLAN.json"  # how much a stage set out to write: the run inspector's "k of n"
# not outputs: bookkeeping, and model cards (README.md, rewritten once the row is complete)
NOT_OUTPUT = (DONE, "_CONFIG.json", "launch.json", PLAN, "README.md")
FULL_HASH_BYTES = 64 << 20  # larger files (model weights) are hashed by their ends and size


def _peft_config(data: bytes) -> bytes:
    """peft writes each set-valued setting (``target_modules``, ``modules_to_save``, ...) as
    ``list(a_set)``, in an order that follows Python's hash seed; every list of names in an
    adapter config is such a set, so the canonical form sorts them (and the keys). It leaves
    out ``base_model_name_or_path``, the folder the base was in when the adapter was saved
    (the stage's config names the policy; the run may have moved since)."""
    obj = json.loads(data)
    obj = {
        k: sorted(v) if _names(v) else v for k, v in obj.items() if k != "base_model_name_or_path"
    }
    return json.dumps(obj, sort_keys=True).encode()


def _names(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, str) for x in v)


# Files whose bytes can vary while their meaning does not, by name: the checksum of a stage
# output (and so the stage's identity for the stages after it) is taken over this canonical
# form, so an identical redo under another hash seed invalidates nothing.
CANONICAL = {"adapter_config.json": _peft_config}


def file_sum(path: Path, canonical: bool = True) -> str:
    """SHA-256 of the file, or, above ``FULL_HASH_BYTES``, of its size and first and last MiB
    (a 7B policy is hashed in milliseconds; a truncated or swapped file still shows); of its
    canonical form for the files named in ``CANONICAL``."""
    path = Path(path)
    if canonical and path.name in CANONICAL:
        try:
            return hashlib.sha256(CANONICAL[path.name](path.read_bytes())).hexdigest()
        except ValueError:  # not the JSON it should be: its bytes, so a damaged file shows
            pass
    h, size = hashlib.sha256(), path.stat().st_size
    with open(path, "rb") as f:
        if size <= FULL_HASH_BYTES:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(str(size).encode() + f.read(1 << 20))
            f.seek(size - (1 << 20))
            h.update(f.read())
    return h.hexdigest()


def output_files(folder: Path) -> dict[str, dict]:
    """Bytes and checksum of every file a stage wrote (model folders included)."""
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        rel = p.relative_to(folder)
        if p.is_file() and p.name not in NOT_OUTPUT and not TEMPORARY.search(p.name):
            out[str(rel)] = {"bytes": p.stat().st_size, "sha256": file_sum(p)}
    return out


class DamagedStage(RuntimeError):
    """A finished stage's file is missing or differs from what ``_DONE.json`` recorded."""


TEMPORARY = re.compile(r"\.tmp(\d+)$")  # an atomic write's temporary name (the writer's pid)
RUN = "${run}"  # how a stage config writes the run folder: a run folder can move


def run_root(path: Path) -> Path | None:
    """The run folder a stage folder is in: the nearest one above with a ``config.yaml``."""
    for parent in Path(path).resolve().parents:
        if (parent / "config.yaml").exists():
            return parent
    return None


def _strings(obj: Any, fn) -> Any:
    """``obj`` with ``fn`` applied to every string in it (dicts and lists walked)."""
    if isinstance(obj, dict):
        return {k: _strings(v, fn) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_strings(v, fn) for v in obj]
    return fn(obj) if isinstance(obj, str) else obj


def portable(obj: Any, root: Path | None) -> Any:
    """``obj`` with every path inside ``root`` written relative to it (``${run}/...``), so
    a copied or moved run resumes; paths outside it (a base model) stay as they are."""

    def rel(s: str) -> str:
        if not s.startswith("/"):
            return s
        try:
            r = Path(s).resolve().relative_to(root)
        except ValueError:
            return s
        return f"{RUN}/{r}" if str(r) != "." else RUN

    return obj if root is None else _strings(obj, rel)


def resolve(obj: Any, root: Path | None) -> Any:
    """The inverse of ``portable``: ``${run}/...`` written as a path inside ``root``, where
    the run is now."""

    def where(s: str) -> str:
        return str(root) + s[len(RUN) :] if s == RUN or s.startswith(RUN + "/") else s

    return obj if root is None else _strings(obj, where)


class Stage:
    """A stage's folder: ``<run>/iter_000/generate/`` or ``<run>/reward_model/``."""

    def __init__(self, path: Path, name: str, config: dict, inputs: list[Path] = ()):
        self.path = Path(path)
        self.name = name
        # the part of the run config this stage's output depends on, and which run of each
        # upstream stage it read: an upstream stage that ran again invalidates this one
        config = {**config, "inputs": {_input_key(Path(p)): done_id(p) for p in inputs}}
        self.root = run_root(self.path)
        self.config = portable(config, self.root)
        self.t0 = time.time()

    @property
    def done_path(self) -> Path:
        return self.path / DONE

    def is_done(self) -> bool:
        return self.done_path.exists()

    def read_done(self) -> dict:
        """``_DONE.json``; paths inside the run in what the stage reports (a refreshed reward
        model) as they are now (the record keeps them as ``${run}/...``: a run can move)."""
        done = json.loads(self.done_path.read_text())  # a missing one is an error here
        return {
            k: v if k in ("config", "files") else resolve(v, self.root) for k, v in done.items()
        }

    def check(self, force: bool = False) -> bool:
        """True when the stage is finished with this config (skip it).

        Raises ``StageConfigChanged`` when it finished or started with another config,
        unless ``force``, which clears the stage so it runs again.
        """
        faults.stop_if_interrupted()
        marker = self.path / "_CONFIG.json"
        recorded = self.read_done()["config"] if self.is_done() else None
        if recorded is None and marker.exists():
            recorded = json.loads(marker.read_text())
        recorded = portable(recorded, self.root)  # runs recorded with absolute paths resume
        if recorded is not None and recorded != self.config:
            keys = diff_keys(recorded, self.config)
            wrote = [p for p in self.path.rglob("*") if p.is_file() and p.name not in NOT_OUTPUT]
            if not wrote and not self.is_done():  # a start that failed before any output
                log.info("%s: started with another config but wrote nothing: starting again "
                         "(differing keys: %s)", self.path, ", ".join(keys))  # fmt: skip
                force = True
            if not force:
                raise StageConfigChanged(
                    f"{self.path}: the config of stage '{self.name}' changed since it ran "
                    f"(differing keys: {', '.join(keys)}). Use another run_name, restore the "
                    f"config, or pass force=true to redo this stage and the ones after it "
                    f"(keys under 'inputs' mean an earlier stage ran again)."
                )
            shutil.rmtree(self.path)
        if self.is_done():
            try:
                self.verify()
                return True
            except DamagedStage as e:
                if not force:
                    raise
                log.warning("%s; force=true: redoing it", e)
                shutil.rmtree(self.path)
        if not marker.exists():
            atomic_write_json(marker, self.config)
        return False

    def verify(self, checksums: bool = True) -> None:
        """Every file ``_DONE.json`` recorded is there with its bytes (and checksum); else
        raise ``DamagedStage`` naming the file and what to do."""
        recorded = self.read_done().get("files")
        for name, want in (recorded or {}).items():  # none: finished before they were recorded
            p = self.path / name
            if p.name in NOT_OUTPUT:  # recorded by an earlier version
                continue
            problem = None
            if not p.exists():
                problem = "is missing"
            elif p.stat().st_size != want["bytes"]:
                problem = f"has {p.stat().st_size} bytes, {want['bytes']} were written"
            elif (
                checksums
                and file_sum(p) != want["sha256"]
                and (p.name not in CANONICAL or file_sum(p, False) != want["sha256"])
            ):  # (the raw bytes' checksum: a stage recorded before CANONICAL named the file)
                problem = "differs from what was written (checksum)"
            if problem:
                raise DamagedStage(
                    f"{p} {problem}: delete {self.path} (or pass force=true) to redo the "
                    f"stage '{self.name}' and the ones after it"
                )

    def finish(self, **info: Any) -> dict:
        """Write ``_DONE.json`` last: config, its hash, wall time, what the stage reports
        and the bytes and checksum of every file it wrote."""
        faults.stop_if_interrupted()  # interrupted work is not finished work
        files = output_files(self.path)
        done = {
            "stage": self.name,
            "config_hash": config_hash(self.config),
            "identity": identity(self.config, files),
            "config": self.config,
            "files": files,
            "seconds": round(time.time() - self.t0, 2),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "finished_unix": f"{time.time():.6f}",
            **portable(info, self.root),
        }
        atomic_write_json(self.done_path, done)
        return self.read_done()
