"""Parquet shards, atomic writes and JSON files: how every stage writes and reads.

- A shard is written to a temporary name in its folder and renamed into place, so a shard
  that exists is complete; readers ignore temporaries (``TEMPORARY``). A folder is made
  whole or not at all the same way (``write_folder``).
- Every shard schema is explicit and lives here.

A stage folder's contract (``_DONE.json``, identity, verification) is ``iterate.store.stage``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from iterate import workers
from iterate.errors import BadInput

log = logging.getLogger(__name__)

PLAN = "_PLAN.json"  # how much a stage set out to write: the run inspector's "k of n"
TEMPORARY = re.compile(r"\.tmp(\d+)$")  # an atomic write's temporary name (the writer's pid)

FIELDS = "fields"  # a prompts shard's column: each row's ``prompts.fields``, as a JSON object


def prompt_id(text: str) -> str:
    """A stored prompt's id: a stable hash of its text (or its JSON list of messages)."""
    return hashlib.sha1(text.encode()).hexdigest()[:16]


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
    "judgement": pa.schema(  # a generative judge's answers (the label stage's judgements/)
        [
            ("prompt_id", pa.string()),
            ("first_idx", pa.int32()),  # the sample shown first (the one scored)
            ("second_idx", pa.int32()),  # the sample shown second; -1: none
            ("attempt", pa.int32()),  # 0: the first answer; n: the n-th retry
            ("text", pa.string()),  # what the judge said
            ("verdict", pa.float64()),  # what it parsed to; null: nothing
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


def read_json(path: Path, default: Any = None, must_exist: bool = False) -> Any:
    """A JSON file's content, or ``default`` when there is no such file (with
    ``must_exist``, a missing file is an error naming it). Every JSON file of a run is read
    here: one that is not JSON (a damaged disk, a hand edit) is ``BadInput`` naming it."""
    path = Path(path)
    if not path.exists():
        if must_exist:
            raise FileNotFoundError(f"{path}: no such file")
        return default
    try:
        return json.loads(path.read_bytes())
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise BadInput(f"{path} is damaged (not JSON: {e}); {_REDO}") from None


def read_jsonl(path: Path) -> list[dict]:
    """A JSON-lines file's objects (``metrics.jsonl``, ``train_log.jsonl``); none when the
    file is not there. A line that is not JSON is ``BadInput`` naming the file and line."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for n, line in enumerate(path.read_bytes().splitlines(), 1):
        try:
            out += [json.loads(line)] if line.strip() else []
        except ValueError as e:
            raise BadInput(f"{path}: line {n} is damaged (not JSON: {e}); {_REDO}") from None
    return out


_REDO = "delete it, or the stage folder it is in, to have it written again"


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


def link_tree(src: Path, dst: Path) -> None:
    """Folder ``dst`` with ``src``'s files: hard links where the file system allows (the
    same bytes, not written or stored twice), else copies. A file written in place later
    would change both: the project writes files whole under a temporary name and renames
    them (``atomic_write_bytes``, ``write_folder``), which replaces a link, not its bytes."""

    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:  # another file system, or one without hard links
            shutil.copy2(a, b)

    shutil.copytree(src, dst, copy_function=link)


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


def read_shard(p: Path, columns: list[str] | None = None) -> pa.Table:
    """One shard; with ``columns``, only those it has (a column added later is left out)."""
    if columns is None:
        return pq.read_table(p)
    have = set(pq.read_schema(p).names)
    return pq.read_table(p, columns=[c for c in columns if c in have])


def read_shards(
    folder: Path, schema: pa.Schema | None = None, columns: list[str] | None = None
) -> pa.Table:
    """The shards of ``folder`` as one table; with ``columns``, only those (a summary need
    not hold every response's token ids). A shard written before a column was added reads
    it as nulls. Work that needs one shard at a time reads them so (``read_shard``)."""
    paths = shard_paths(folder)
    if not paths:
        if schema is None:
            raise FileNotFoundError(f"no shards in {folder}")
        empty = schema.empty_table()
        return empty.select(columns) if columns else empty
    return pa.concat_tables([read_shard(p, columns) for p in paths], promote_options="default")


def clean_temporaries(folder: Path) -> list[Path]:
    """Remove ``*.tmp<pid>`` files and folders under ``folder`` whose process is gone (an
    atomic write, a handoff save or a toy-world build cut short); returns what was
    removed."""
    removed = []
    for p in sorted(Path(folder).rglob("*.tmp*")):
        m = TEMPORARY.search(p.name)
        if not m or int(m.group(1)) == os.getpid() or workers.alive(int(m.group(1))):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    if removed:
        log.warning(
            "removed %d temporary file(s) left by dead processes: %s",
            len(removed),
            ", ".join(str(p.relative_to(folder)) for p in removed[:5]),
        )
    return removed
