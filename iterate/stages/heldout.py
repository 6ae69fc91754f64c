"""The run's held-out set, made once by the loop before iteration 0 (``<run>/heldout/``):

- ``prompts``: the held-out prompts, drawn once from the source and from then on read from
  here whatever the source holds now (the prompts stage never draws them again);
- ``initial_samples``: the initial policy's samples of them (``heldout/initial_samples/``),
  the baseline every iteration's win rate is measured against.

``sample`` is how both the initial and each new policy's held-out samples are drawn (the
evaluate stage uses it for the new policy's), and ``reference`` what the evaluation's win
rates compare them with (``evaluate.reference``): the initial policy's samples, those of the
policy the iteration started from (``previous``), or a file of reference outputs matched by
prompt text (``file``: AlpacaEval's JSON format, jsonl, parquet).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa

from iterate.config import Config
from iterate.errors import BadInput
from iterate.sampling import samplers
from iterate.stages import prompts as sources
from iterate.store import seeds
from iterate.store.paths import Paths
from iterate.store.shards import (
    SCHEMAS,
    prompt_id,
    read_json,
    read_shards,
    shard_path,
    write_plan,
    write_shard,
)
from iterate.store.stage import DONE, Stage, counted, file_sum, folder_sum
from iterate.train import models

log = logging.getLogger(__name__)


def prompts(cfg: Config, paths: Paths) -> pa.Table:
    """The held-out prompts of the run: drawn once, written to ``<run>/heldout/``, and from
    then on read from there whatever the source holds now."""
    stage = Stage(paths.heldout_dir, "heldout", sources.heldout_config(cfg))
    if not stage.check(cfg.force):
        _, held, dropped, source, fields = sources.pools(cfg)
        if len(held) < cfg.prompts.heldout:  # every figure and gate rests on fewer: say so
            where = cfg.prompts.heldout_path or cfg.prompts.path or "the toy world"
            log.warning(
                "prompts.heldout=%d, but %s has %d held-out prompts (dropped: %s): the "
                "evaluation, its win rates and the handoff's gates rest on those",
                cfg.prompts.heldout,
                where,
                len(held),
                dict(dropped) or "none",
            )
        write_shard(sources.table(held, fields), shard_path(stage.path, 0))
        stage.finish(rows_out=len(held), dropped=dict(dropped), asked=cfg.prompts.heldout, **source)
    return read_shards(stage.path)


def params(cfg: Config) -> samplers.Params:
    return samplers.Params(
        n=cfg.evaluate.samples, temperature=1.0, top_p=1.0, max_tokens=cfg.generate.max_tokens
    )


def sample(
    cfg: Config,
    tok,
    heldout: pa.Table,
    out: Path,
    unit: int,
    put: Callable,
    stage: tuple[int, str] | None = None,
) -> tuple[pa.Table, dict]:
    """Samples of the held-out prompts as shards in ``out`` (resumable; a shard seeded from
    (seed, unit, shard)), from the policy ``put(sampler)`` gives the sampler; returns them
    and what was dropped. ``stage``: (iteration, stage) for the crash tests' kill points
    (the evaluation of iteration ``unit - 1``, unless said)."""
    gc = cfg.generate
    shards, dropped = samplers.plan(
        tok, heldout, cfg.model.max_length - gc.max_tokens, gc.shard_size
    )
    timings = {}
    write_plan(out, "shards", len(shards))
    if todo := samplers.missing(shards, out):
        with samplers.session(cfg) as sampler:
            put(sampler)
            samplers.write_shards(
                sampler,
                todo,
                params(cfg),
                lambda k: seeds.derive("heldout", cfg.seed, unit, k),
                out,
                stage or (unit - 1, "evaluate"),
                f"held-out samples ({gc.backend})",
            )
            timings = sampler.timings
    return read_shards(out, SCHEMAS["generate"]), {"dropped": dict(dropped), "timings": timings}


def sample_conf(cfg: Config) -> dict:
    return {
        "evaluate": {"samples": cfg.evaluate.samples},
        "max_tokens": cfg.generate.max_tokens,
        "model": counted(cfg, "model"),
        "seed": cfg.seed,
    }


def initial_samples(cfg: Config, paths: Paths) -> pa.Table:
    """The initial policy's held-out samples, drawn once per run (the win-rate baseline)."""
    conf = {**sample_conf(cfg), "policy": paths.base_policy}
    stage = Stage(paths.initial_samples_dir, "initial_samples", conf, inputs=[paths.heldout_dir])
    if not stage.check(cfg.force):
        tok = models.load_tokenizer(paths.base_policy, cfg.model.chat_template)
        put = lambda sampler: sampler.load(paths.base_policy)  # noqa: E731
        table, info = sample(cfg, tok, read_shards(paths.heldout_dir), stage.path, 0, put)
        stage.finish(rows_out=table.num_rows, **info, **samplers.summary(table))
    return read_shards(stage.path, SCHEMAS["generate"])


class Reference(NamedTuple):
    """The reference responses of a new policy's held-out samples: ``table`` (columns
    ``prompt``, ``response``), each sample's row in it (``index``; None: the sample's prompt
    has no reference) and what to report (``info``: the kind, and how many held-out prompts
    have a reference and how many do not)."""

    table: pa.Table | None
    index: list[int | None]
    info: dict


def aligned(samples: pa.Table, table: pa.Table) -> list[int | None]:
    """Each sample's row in ``table``, another policy's samples of the same held-out prompts:
    the same prompt and sample number."""
    key = lambda t: zip(t["prompt_id"].to_pylist(), t["sample_idx"].to_pylist())  # noqa: E731
    rows = {k: j for j, k in enumerate(key(table))}
    return [rows.get(k) for k in key(samples)]


def started_from(paths: Paths, i: int) -> int | None:
    """The iteration whose handed-off policy iteration ``i`` started from (the last one
    accepted before it; None: the initial policy)."""
    for j in range(i - 1, -1, -1):
        if read_json(paths.stage(j, "handoff") / DONE).get("kl", {}).get("accepted"):
            return j
    return None


def reference_conf(cfg: Config, paths: Paths, i: int) -> tuple[dict, list[Path]]:
    """What the evaluation's identity gains from its reference (nothing for the initial
    samples, the default), and the stage folders it reads."""
    ref = cfg.evaluate.reference
    if ref.kind == "initial":
        return {}, []
    if ref.kind == "previous":
        j = started_from(paths, i)
        return {"kind": "previous"}, [paths.stage(j, "evaluate")] if j is not None else []
    p = Path(str(ref.path))
    return {
        "kind": "file",
        "outputs": {
            "sha256": file_sum(p) if p.is_file() else folder_sum(p),
            "prompt_field": ref.prompt_field,
            "output_field": ref.output_field,
        },
    }, []


def outputs(path: str, prompt_field: str, output_field: str) -> dict[str, tuple[str, str]]:
    """A reference outputs file: prompt id -> (prompt, output). The prompt is read as
    ``prompts.field`` is (text or messages); an output that is not text, or a prompt given
    twice with different outputs, is bad input named by file, rows and field."""
    from iterate.preferences import read_rows

    if not Path(path).exists():
        raise FileNotFoundError(f"evaluate.reference.path: no such file: {path}")
    ds = read_rows(path, "evaluate.reference.path")
    for name, key in ((prompt_field, "prompt_field"), (output_field, "output_field")):
        if name not in ds.column_names:
            raise BadInput(
                f"{path}: no field '{name}' (evaluate.reference.{key}; columns: "
                f"{', '.join(ds.column_names)})"
            )
    found: dict[str, tuple[str, str]] = {}
    row: dict[str, int] = {}
    for k, (p, out) in enumerate(zip(ds[prompt_field], ds[output_field], strict=True)):
        text = sources.prompt_text(p, f"{path}: row {k}", prompt_field) if p is not None else ""
        if not isinstance(out, str):
            raise BadInput(
                f"{path}: row {k}: field '{output_field}': expected the reference "
                f"output as text, got {type(out).__name__}"
            )
        if not text:
            continue
        i = prompt_id(text)
        if i in found and found[i][1] != out:
            raise BadInput(
                f"{path}: rows {row[i]} and {k} give different outputs "
                f"('{output_field}') for one prompt ({text[:60]!r}): keep "
                "one"
            )
        found.setdefault(i, (text, out))
        row.setdefault(i, k)
    return found


def check_reference(cfg: Config, paths: Paths) -> None:
    """A reference outputs file (``evaluate.reference.kind=file``) read as soon as the
    held-out set is drawn, before any iteration: a bad file (a field missing, an output not
    text, two outputs for one prompt) or one that has none of the held-out prompts stops the
    run here; one that lacks some is said here."""
    ref = cfg.evaluate.reference
    if str(ref.kind) != "file":
        return
    ids = set(read_shards(paths.heldout_dir)["prompt_id"].to_pylist())
    found = outputs(str(ref.path), ref.prompt_field, ref.output_field)
    have = ids & found.keys()
    if not have:
        raise BadInput(
            f"evaluate.reference.path={ref.path}: none of its {len(found)} prompts "
            f"('{ref.prompt_field}') is one of the {len(ids)} held-out prompts: "
            "give the reference outputs of the held-out prompts "
            "(prompts.heldout_path)"
        )
    if len(have) < len(ids):
        log.warning(
            "evaluate.reference.path=%s has outputs for %d of the %d held-out prompts: "
            "the others are left out of its win rates",
            ref.path,
            len(have),
            len(ids),
        )


def previous(paths: Paths, i: int, samples: pa.Table) -> Reference:
    """The held-out samples of the policy iteration ``i`` started from, aligned with
    ``samples``: the evaluation's of the iteration that handed it off, or a ``table`` of
    None where that is the initial policy (its samples are the initial ones)."""
    j = started_from(paths, i)
    info = {"kind": "previous", "iteration": j}
    if j is None:
        return Reference(None, [], info)
    table = read_shards(paths.evaluation_samples(j), SCHEMAS["generate"])
    return Reference(table, aligned(samples, table), info)


def reference(cfg: Config, paths: Paths, i: int, samples: pa.Table) -> Reference:
    """What iteration ``i``'s held-out samples are compared with (``evaluate.reference``);
    a ``table`` of None where that is the initial policy's samples (``previous`` in an
    iteration that started from the initial policy too)."""
    ref, kind = cfg.evaluate.reference, str(cfg.evaluate.reference.kind)
    if kind == "initial":
        return Reference(None, [], {"kind": kind})
    if kind == "previous":
        return previous(paths, i, samples)
    ids = samples["prompt_id"].to_pylist()
    found = outputs(str(ref.path), ref.prompt_field, ref.output_field)
    have = sorted({p for p in ids if p in found})
    row = {p: j for j, p in enumerate(have)}
    table = pa.table(
        {"prompt": [found[p][0] for p in have], "response": [found[p][1] for p in have]}
    )
    missing = {p for p in ids if p not in row}
    if missing:
        log.warning(
            "evaluate: %d of %d held-out prompts have no reference output in %s: "
            "left out of the win rates",
            len(missing),
            len(set(ids)),
            ref.path,
        )
    info = {"kind": kind, "prompts": len(have), "unreferenced": len(missing)}
    return Reference(table, [row.get(p) for p in ids], info)
