"""The contract of every stage folder: ``_DONE.json`` written last, the identity of a
finished stage, and its verification.

- ``_DONE.json`` records the stage's config (and its hash), what it reports, and the bytes
  and checksum of every file it wrote; a stage whose config changed since it ran is refused,
  naming the differing keys, unless forced; a finished stage whose files differ from the
  record is damaged.
- A stage's identity (what the stages after it hash as their input) is built from content
  only: its config and its files' checksums, canonical where a file's bytes may vary while
  its meaning does not (``CANONICAL``). Its config holds only the settings that decide
  what it writes (``COUNTED``, ``counted``).
- Paths inside the run folder are written ``${run}/...``: a run folder can move.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from iterate import faults, progress
from iterate.config import Config, plain
from iterate.errors import BadInput
from iterate.store.paths import CONFIG
from iterate.store.shards import PLAN, TEMPORARY, atomic_write_json, read_json

DONE = "_DONE.json"

log = logging.getLogger(__name__)


class StageConfigChanged(BadInput):
    """A finished (or started) stage's config differs from the run's now."""


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
    d = read_json(p)
    if "identity" in d:
        return d["identity"]
    if "files" in d:
        return f"{d['config_hash']}:{config_hash(d['files'])}"
    return f"{d['config_hash']}@{d['finished_unix']}"


def identity(config: dict, files: dict[str, dict]) -> str:
    """A stage's identity from content only: its config and its files' checksums (canonical
    ones, see ``CANONICAL``; not their sizes, which a canonical file's bytes need not keep)."""
    return f"{config_hash(config)}:{config_hash({k: v['sha256'] for k, v in files.items()})}"


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


def folder_sum(folder: Path) -> str:
    """A checksum of every file in a folder (``file_sum`` each; an ensemble's members
    included), leaving out hidden files and a trainer's ``checkpoint-*``: what a model folder
    from outside the run is, so new weights under the same name are a changed input."""
    folder = Path(folder)

    def part(p: Path) -> bool:  # not a download cache, nor a trainer's checkpoint in it
        return not any(x.startswith((".", "checkpoint-")) for x in p.relative_to(folder).parts)

    files = sorted(p for p in folder.rglob("*") if p.is_file() and part(p))
    return config_hash({str(p.relative_to(folder)): file_sum(p) for p in files})


def output_files(folder: Path) -> dict[str, dict]:
    """Bytes and checksum of every file a stage wrote (model folders included)."""
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        rel = p.relative_to(folder)
        if p.is_file() and p.name not in NOT_OUTPUT and not TEMPORARY.search(p.name):
            out[str(rel)] = {"bytes": p.stat().st_size, "sha256": file_sum(p)}
    return out


class DamagedStage(BadInput):
    """A finished stage's file is missing or differs from what ``_DONE.json`` recorded."""


RUN = "${run}"  # how a stage config writes the run folder: a run folder can move


def run_root(path: Path) -> Path | None:
    """The run folder a stage folder is in: the nearest one above with a ``config.yaml``."""
    for parent in Path(path).resolve().parents:
        if (parent / CONFIG).exists():
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


# What a stage's identity is built from, per config section a stage hashes: the settings
# that decide what it writes (``COUNTED``), never the section whole. The others
# (``NOT_COUNTED``) are names shown in cards and how the work is spread over the machine
# (scoring settings are counted by the stages that score: ``rewards.Reward.identity``).
# Every setting of these sections is in one list or the other (a test holds the lists to
# the dataclasses), so a new setting is classified when it is added. The update section's
# lists are the rule table's (``rules.Rule.keys``).
NOT_COUNTED = {
    "model": ("name",),
    "generate": (
        "keep_engine",
        "batch_size",
        "gpu_memory_utilization",
        "enforce_eager",
        "workers",
        "threads",
        "tensor_parallel_size",
        "sleep_level",
        "engine_stall_s",
    ),
    "reward": (
        "name",
        "kind",
        "function",
        "sources",
        "pairwise_template",
        "judge",
        "workers",
        "threads",
        "aggregate",
        "uncertainty_coef",
        "refresh",
        "cache",
        "function_timeout_s",
    ),
    "reward.refresh": (),
    "prompts": (),
    "pairs": (),
    "handoff": (),
}
COUNTED = {
    "model": ("path", "dtype", "max_length", "chat_template"),
    "generate": ("backend", "n", "temperature", "top_p", "max_tokens", "shard_size"),
    "reward": (
        "path",
        "train",
        "source",
        "data",
        "prompts",
        "label_function",
        "samples",
        "base",
        "chat_template",
        "num_pairs",
        "label_noise",
        "heldout_fraction",
        "lora",
        "epochs",
        "batch_size",
        "grad_accum",
        "lr",
        "max_length",
        "dtype",
        "ensemble",
        "score_batch_size",
    ),
    "reward.refresh": ("pairs", "judge", "judge_path", "path", "rule", "replay", "epochs", "lr"),
    "prompts": (
        "synthetic",
        "source",
        "path",
        "split",
        "field",
        "fields",
        "per_iteration",
        "heldout",
        "heldout_path",
        "heldout_field",
    ),
    "pairs": ("rule", "length_penalty", "min_margin"),
    "handoff": (
        "max_kl",
        "max_length_ratio",
        "min_lc_win_rate",
        "on_reject",
        "reference",
        "constrain",
        "kl_target",
        "constrain_prompts",
        "extrapolate",
        "reward_tolerance_se",
    ),
}


def counted(cfg: Config, section: str) -> dict:
    """The settings of ``section`` (``model``, ``reward.refresh``, ...) that a stage's
    identity is built from, as plain types."""
    obj = cfg
    for part in section.split("."):
        obj = getattr(obj, part)
    values = plain(obj)
    return {k: values[k] for k in COUNTED[section]}


# Settings that earlier versions hashed and that no longer count (``NOT_COUNTED``), by
# stage ("*": every stage; a key names itself and what is under it): a stage recorded with
# them is not a stage whose config changed.
RETIRED = {
    "*": ("model.name", "reward.name"),
    "heldout": ("prompts.per_iteration", "prompts.synthetic"),  # the draw does not read them
    "prompts": ("prompts.synthetic.max_rounds",),  # whether they come, not which
}


# What later versions record that earlier ones did not (by the key's last part), with the
# value that means "as before" (ANY: whatever it is): a stage recorded without it resumes as
# it was while the setting has that value; once recorded, a change of it counts.
ANY = object()
ADDED = {
    "reward_weights": ANY,  # an outside reward model's checksum (folder_sum)
    "max_length_ratio": None,  # the handoff's length gates
    "min_lc_win_rate": None,
    "heldout_path": None,  # a held-out prompts file
    "heldout_field": None,
    "group_by_length": False,  # the pair rules' length-grouped steps
    "judge_identity": ANY,  # the evaluation judges' sources and weights (evaluate)
    "prompts": None,  # reward.source=policy's settings
    "label_function": None,
    "label_identity": ANY,  # reward.label_function's source (reward_model)
    "samples": 4,
    "constrain": False,  # the KL constraint before the evaluation (handoff)
    "kl_target": 0.8,
    "constrain_prompts": 32,
    "extrapolate": False,  # the KL constraint's extrapolation past the update
    "reward_tolerance_se": None,  # the handoff's gate against the starting policy
}


def retired(stage: str, key: str) -> bool:
    return any(
        key == r or key.startswith(r + ".") for r in (*RETIRED["*"], *RETIRED.get(stage, ()))
    )


def _added(recorded: dict, now: dict, key: str) -> bool:
    """Whether ``key`` is one that ``recorded`` (a stage config) predates, at the value that
    means what was done before (``now``: the stage config of this invocation). A key names
    itself by its last part, or by a part above it whose value is ``ANY`` (a section added
    whole: ``judge_identity.gold.source_tree_sha256``)."""
    parts = key.split(".")
    name = parts[-1]
    if name not in ADDED:
        above = [k for k, p in enumerate(parts[:-1]) if ADDED.get(p, None) is ANY]
        if not above:
            return False
        section = ".".join(parts[: above[0] + 1])
        had = flatten(recorded)
        return not any(k == section or k.startswith(section + ".") for k in had)
    if key in flatten(recorded):
        return False
    return ADDED[name] is ANY or flatten(now).get(key) == ADDED[name]


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
        done = read_json(self.done_path, must_exist=True)
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
            recorded = read_json(marker)
        recorded = portable(recorded, self.root)  # runs recorded with absolute paths resume
        keys = diff_keys(recorded, self.config) if recorded is not None else []
        if keys and all(retired(self.name, k) or _added(recorded, self.config, k) for k in keys):
            log.info("%s: recorded with settings that no longer count (%s)", self.path, keys)
            keys = []
        if keys:
            wrote = [p for p in self.path.rglob("*") if p.is_file() and p.name not in NOT_OUTPUT]
            if not wrote and not self.is_done():  # a start that failed before any output
                log.info(
                    "%s: started with another config but wrote nothing: starting again "
                    "(differing keys: %s)",
                    self.path,
                    ", ".join(keys),
                )
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
        progress.reset_peak_rss()  # the work starts: its own peak memory (``finish``)
        progress.reset_peak_gpu()
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
            "peak_rss_mb": round(progress.peak_rss_mb()),  # this process's, since ``check``
            **({"peak_gpu_mb": round(gpu)} if (gpu := progress.peak_gpu_mb()) is not None else {}),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "finished_unix": f"{time.time():.6f}",
            **portable(info, self.root),
        }
        atomic_write_json(self.done_path, done)
        return self.read_done()
