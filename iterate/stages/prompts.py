"""Prompts: a deduplicated pool, a held-out set for evaluation, a disjoint slice per iteration.

The pool comes from the toy world's instruction families, a local jsonl/parquet file, or a
``datasets`` dataset. Each prompt's id is a stable hash of its text, duplicates are dropped
and counted, and the order is a seeded shuffle by hash, so the same source always gives the
same slices.

What the run already used is the truth, not the source: the held-out set is drawn once and
kept in ``<run>/heldout/``, and iteration ``i`` takes the first ``per_iteration`` prompts of
the shuffled pool that are neither held out nor in an earlier iteration's
``iter_j/prompts/``. So a source that grows (or shrinks) between invocations never moves a
held-out prompt into training nor repeats a prompt: new prompts join the draws of the
iterations still to come. The source's content hash is recorded in every prompts
``_DONE.json``, and a change is logged with what it added.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from pathlib import Path

import pyarrow as pa

from iterate.config import Config
from iterate.errors import BadInput
from iterate.store.paths import Paths
from iterate.store.shards import (
    FIELDS,
    prompt_id,
    read_json,
    read_shards,
    shard_path,
    shard_paths,
    write_shard,
)
from iterate.store.stage import DONE, Stage, counted

log = logging.getLogger(__name__)

SCHEMA = pa.schema([("prompt_id", pa.string()), ("prompt", pa.string())])


def prompt_text(value, where: str, field: str) -> str:
    """A stored prompt: plain text, or a JSON list of messages for a conversation (a list of
    ``{"role", "content"}``, or an HH-RLHF transcript, whose final Assistant turn, if any,
    is the response and is left out)."""
    if isinstance(value, str) and value.lstrip(" ").startswith("\n\nHuman:"):
        from iterate.preferences import MalformedRow, parse_hh

        ends_with_human = value.rfind("\n\nHuman:") > value.rfind("\n\nAssistant:")
        text = value + "\n\nAssistant: -" if ends_with_human else value
        try:
            value = parse_hh(text, where, field)[0]
        except MalformedRow as e:
            raise BadInput(str(e)) from None
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        missing = [k for m in value for k in ("role", "content") if k not in m]
        if missing:
            raise BadInput(f"{where}: field '{field}': a message lacks '{missing[0]}'")
        return json.dumps([{"role": m["role"], "content": m["content"]} for m in value])
    raise BadInput(
        f"{where}: field '{field}': expected text or a list of messages, got {type(value).__name__}"
    )


Row = tuple[str, dict]  # a prompt's text and its row's fields named by prompts.fields
TOY_FIELDS = ("answer", "family")  # what a toy-world prompt row has besides its text


def _rows(cfg: Config) -> tuple[list[Row], list[Row], Counter]:
    """(training rows, held-out rows, dropped by reason) of the source, before shuffling:
    the held-out rows are the toy world's own, or ``prompts.heldout_path``'s, else none (a
    slice of the one pool is held out)."""
    pc, names = cfg.prompts, list(cfg.prompts.fields)
    dropped: Counter = Counter()
    heldout: list[Row] = []
    if pc.source == "toy":
        from iterate.toy import world

        if unknown := [n for n in names if n not in TOY_FIELDS]:
            raise BadInput(
                f"prompts.fields: the toy world's prompts have no field "
                f"{unknown[0]!r} (they have {', '.join(TOY_FIELDS)})"
            )
        train_items, heldout_items = world.split(cfg.toy.heldout_fraction)
        row = lambda i: (i.prompt, {n: getattr(i, n) for n in names})  # noqa: E731
        train, heldout = [row(i) for i in train_items], [row(i) for i in heldout_items]
        train += [row(i) for i in world.WIDER]  # drawn after the written ones (``pools``)
    elif pc.source == "file":
        if not pc.path or not Path(pc.path).exists():
            raise FileNotFoundError(f"prompts.path: no such file: {pc.path}")
        train = read(pc.path, pc.path, pc.field, names, dropped)
    else:
        import datasets

        ds = datasets.load_dataset(pc.path, split=pc.split)
        train = read(ds, f"{pc.path}[{pc.split}]", pc.field, names, dropped)
    if pc.heldout_path:
        if not Path(pc.heldout_path).exists():
            raise FileNotFoundError(f"prompts.heldout_path: no such file: {pc.heldout_path}")
        field = pc.heldout_field or pc.field
        key = "prompts.heldout_field" if pc.heldout_field else "prompts.field"
        heldout = read(
            pc.heldout_path, pc.heldout_path, field, names, dropped, key, "prompts.heldout_path"
        )
        if pc.source == "toy":  # its gold judge and answer check, which evaluate, know its own
            from iterate.toy import world

            other = next((t for t, _ in heldout if world.parse(t) is None), None)
            if other is not None:
                raise BadInput(
                    f"prompts.heldout_path={pc.heldout_path}: {other[:80]!r} is not "
                    "a toy-world prompt, and with prompts.source=toy the evaluation's "
                    "gold judge (iterate.toy.world) scores only those: leave "
                    "prompts.heldout_path unset, or load the training prompts too "
                    "(prompts.source=file) with a reward for them"
                )
    return train, heldout, dropped


def read(
    ds,
    where: str,
    field: str,
    names: list[str],
    dropped: Counter,
    key: str = "prompts.field",
    setting: str = "prompts.path",
) -> list[Row]:
    """The prompt rows of a file (jsonl / json / parquet, or a saved dataset: its path, which
    the config key ``setting`` gave) or a loaded ``datasets`` dataset; empty prompts dropped
    and counted."""
    if isinstance(ds, str):
        from iterate.preferences import read_rows

        ds = read_rows(ds, setting)
    for name, said in ((field, key), *((n, "prompts.fields") for n in names)):
        if name not in ds.column_names:
            raise BadInput(
                f"{where}: no field '{name}' ({said}; columns: {', '.join(ds.column_names)})"
            )
    extra = {n: ds[n] for n in names}
    rows, missing = [], []
    for i, value in enumerate(ds[field]):
        if value is None:  # the row has no such field (or it is null)
            missing.append(i)
            continue
        text = prompt_text(value, f"{where}: row {i}", field)
        if not text:
            dropped["empty"] += 1
            continue
        rows.append((text, {n: extra[n][i] for n in names}))
    if missing:
        dropped["no_prompt"] += len(missing)
        if not rows:
            raise BadInput(f"{where}: no row has a prompt in field '{field}' ({key})")
        log.warning(
            "%s: %d rows have no field '%s' (%s), the first row %d: dropped and "
            "counted (no_prompt)",
            where,
            len(missing),
            field,
            key,
            missing[0],
        )
    return rows


def load_pool(cfg: Config) -> tuple[list[str], list[str], Counter, dict | None]:
    """(training pool, held-out pool, dropped by reason) before shuffling, and prompt id ->
    the fields ``prompts.fields`` names of its row (the first row of a prompt that appears
    twice; None when it names none), from one read of the source."""
    train, heldout, dropped = _rows(cfg)
    fields: dict[str, dict] | None = {} if cfg.prompts.fields else None
    if fields is not None:
        for text, row in [*train, *heldout]:
            fields.setdefault(prompt_id(text), row)
    return [t for t, _ in train], [t for t, _ in heldout], dropped, fields


def _dedupe_shuffle(texts: list[str], seed: int, dropped: Counter) -> list[str]:
    seen, out = set(), []
    for t in texts:
        pid = prompt_id(t)
        if pid in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(pid)
        out.append(t)
    return sorted(out, key=lambda t: hashlib.sha1(f"{seed}:{prompt_id(t)}".encode()).digest())


def table(texts: list[str], fields: dict[str, dict] | None = None) -> pa.Table:
    """A prompts shard; with ``fields`` (prompt id -> fields), each row's fields as a JSON
    object in the ``fields`` column (a prompt without a row there, a synthetic one: {})."""
    ids = [prompt_id(t) for t in texts]
    if fields is None:
        return pa.table({"prompt_id": ids, "prompt": texts}, schema=SCHEMA)
    said = [json.dumps(fields.get(i, {}), sort_keys=True, default=str) for i in ids]
    schema = SCHEMA.append(pa.field(FIELDS, pa.string()))
    return pa.table({"prompt_id": ids, "prompt": texts, FIELDS: said}, schema=schema)


def source_hash(train: list[str], heldout: list[str]) -> str:
    """The content of a prompts source: a hash of its prompts, in order."""
    h = hashlib.sha256()
    for t in [*train, "\0heldout\0", *heldout]:
        h.update(t.encode() + b"\0")
    return h.hexdigest()[:16]


def pools(cfg: Config) -> tuple[list[str], list[str], Counter, dict, dict | None]:
    """(shuffled training pool, held-out candidates, dropped by reason, source info, the
    rows' fields as ``load_pool`` gives them)."""
    train, heldout, dropped, fields = load_pool(cfg)
    source = {
        "source_hash": source_hash(train, heldout),
        "source_prompts": len(train) + len(heldout),
    }
    if heldout:  # a held-out prompt never enters training
        kept, before = {prompt_id(t) for t in heldout}, len(train)
        train = [t for t in train if prompt_id(t) not in kept]
        if len(train) < before:
            dropped["held_out"] += before - len(train)
    train = _dedupe_shuffle(train, cfg.seed, dropped)
    written = set(_written(cfg, train))  # the written prompts first, then the wider grammar's
    train.sort(key=lambda t: t not in written)  # (stable: each tier in its shuffled order)
    if heldout:
        heldout = _dedupe_shuffle(heldout, cfg.seed, dropped)[: cfg.prompts.heldout]
    else:  # one pool: the first prompts of the shuffled order are held out
        heldout = train[: cfg.prompts.heldout]
    return train, heldout, dropped, source, fields


def _written(cfg: Config, train: list[str]) -> list[str]:
    """The pool's written prompts: a toy pool without the grammar's wider instructions,
    which are drawn after them but neither shown to a prompt writer nor counted as known."""
    if cfg.prompts.source != "toy":
        return train
    from iterate.toy import world

    wider = {i.prompt for i in world.WIDER}
    return [t for t in train if t not in wider]


def config(cfg: Config) -> dict:
    prompts = counted(cfg, "prompts")
    if not prompts["fields"]:  # none: what runs before prompts.fields recorded
        del prompts["fields"]
    # how many rounds to try decides whether the prompts come, not which: a rerun that
    # raises it after a shortfall goes on from the rounds kept (synthetic.write)
    del prompts["synthetic"]["max_rounds"]
    return {
        "prompts": prompts,
        "seed": cfg.seed,
        "toy_heldout_fraction": cfg.toy.heldout_fraction,
    }


# what decides the held-out draw: the source and how many (not each iteration's share, nor
# the synthetic prompts' settings, so the smaller share a shortfall asks for is accepted)
DRAW = (
    "source",
    "path",
    "split",
    "field",
    "fields",
    "heldout",
    "heldout_path",
    "heldout_field",
)


def heldout_config(cfg: Config) -> dict:
    conf = config(cfg)
    return {**conf, "prompts": {k: v for k, v in conf["prompts"].items() if k in DRAW}}


def check_pool(cfg: Config, paths: Paths) -> None:
    """Bad input found before any work: a source drawn from (not ``prompts.synthetic``)
    must hold the prompts of every iteration still to draw, besides the held-out set and
    what earlier iterations drew. Found here, before the toy world, the reward model and
    the held-out samples, not when the short iteration comes."""
    pc = cfg.prompts
    if pc.synthetic.enabled:
        return
    todo = [i for i in range(cfg.iteration) if not (paths.stage(i, "prompts") / DONE).exists()]
    if not todo:
        return
    train, held, _, _, _ = pools(cfg)
    drawn = [i for i in range(cfg.iteration) if i not in todo]
    if shard_paths(paths.heldout_dir):  # drawn already: it is what counts
        used = _used(paths, drawn)
    else:
        used = {prompt_id(t) for t in held} | _used(paths, drawn, heldout=False)
    fresh = sum(prompt_id(t) not in used for t in train)
    need = pc.per_iteration * len(todo)
    if fresh < need:
        can, each = fresh // pc.per_iteration, fresh // len(todo)
        lower = f"lower prompts.per_iteration to {each}, " if each else ""
        raise BadInput(
            f"prompts: iterations {todo[0]}..{todo[-1]} need {need} prompts the run has not "
            f"used yet ({len(todo)} x prompts.per_iteration={pc.per_iteration}), but the "
            f"pool has {fresh} ({len(train)} after deduplication, {len(used)} held out or "
            f"drawn); ask for iteration={cfg.iteration - len(todo) + can}, "
            f"{lower}or add prompts to the source"
        )


def _ids(folder: Path) -> set[str]:
    return set(read_shards(folder)["prompt_id"].to_pylist())


def _used(paths: Paths, iterations, heldout: bool = True) -> set[str]:
    """The ids of the prompts the run used: held out (when ``heldout``) and drawn by
    ``iterations``."""
    used = _ids(paths.heldout_dir) if heldout else set()
    for j in iterations:
        used |= _ids(paths.stage(j, "prompts"))
    return used


def run(cfg: Config, paths: Paths, i: int, policy: str = "") -> pa.Table:
    """Write iteration ``i``'s prompts to ``iter_i/prompts/`` and return them: the first
    ``per_iteration`` prompts of the shuffled pool that the run has not used yet (held out,
    or drawn by iterations ``0 .. i-1``), or with ``prompts.synthetic`` new prompts written
    from the pool's (``iterate.synthetic``) by ``policy`` or the configured generator."""
    sc = cfg.prompts.synthetic
    conf = config(cfg) | ({"generator": sc.generator or policy} if sc.enabled else {})
    stage = Stage(paths.stage(i, "prompts"), "prompts", conf)
    if not stage.check(cfg.force):
        train, _, dropped, source, fields = pools(cfg)
        used = _used(paths, range(i))
        if sc.enabled:  # (shown the written prompts: the toy pool's wider tier is for drawing)
            seeds = _written(cfg, train)
            chunk, info = _synthetic(cfg, paths, i, policy, seeds, stage.path / "passed")
        else:
            chunk, info = _slice(cfg, paths, i, train, used, source)
        write_shard(table(chunk, fields), shard_path(stage.path, 0))
        stage.finish(rows_out=len(chunk), pool=len(train), dropped=dict(dropped), **info, **source)
    return read_shards(stage.path)


def _slice(
    cfg: Config, paths: Paths, i: int, train: list[str], used: set, source: dict
) -> tuple[list[str], dict]:
    fresh = [t for t in train if prompt_id(t) not in used]
    k = cfg.prompts.per_iteration
    if len(fresh) < k:
        raise BadInput(
            f"prompts: iteration {i} needs {k} prompts the run has not used yet, but the pool "
            f"has {len(fresh)} ({len(train)} after deduplication, {len(used)} held out or "
            f"drawn by iterations 0..{i - 1}); lower prompts.per_iteration or the number of "
            f"iterations, or add prompts to the source (the held-out set and earlier "
            f"iterations keep theirs)"
        )
    drawn = read_json(paths.heldout_dir / DONE).get("source_hash")
    if drawn not in (None, source["source_hash"]):
        log.info(
            "prompts: the source changed since the held-out set was drawn (now %d prompts); "
            "the held-out set and iterations 0..%d keep their prompts, iteration %d draws "
            "from the %d not used yet",
            source["source_prompts"],
            i - 1,
            i,
            len(fresh),
        )
    return fresh[:k], {"unused": len(fresh) - k}


def generator(cfg: Config, policy: str) -> tuple[str, str | None]:
    """(model, chat template override) of the configured generator."""
    name = cfg.prompts.synthetic.generator
    if not name:
        return policy, cfg.model.chat_template
    if name == "toy_writer":
        from iterate.toy import writer

        return str(writer.ensure(cfg.toy)), None
    return name, None


def _synthetic(
    cfg: Config, paths: Paths, i: int, policy: str, train: list[str], passed: Path
) -> tuple[list[str], dict]:
    """New prompts, none repeating or near-repeating the pool, the held-out set or an
    earlier iteration's prompts."""
    from iterate import synthetic

    known = [*train, *read_shards(paths.heldout_dir)["prompt"].to_pylist()]
    for j in range(i):
        known += read_shards(paths.stage(j, "prompts"))["prompt"].to_pylist()
    writer = generator(cfg, policy)
    in_world = None
    if str(cfg.prompts.source) == "toy":  # the toy world answers only its grammar's prompts
        from iterate.toy import world

        in_world = lambda text: world.parse(text) is not None  # noqa: E731
    known = synthetic.Known(known)
    chunk, info = synthetic.write(cfg, i, writer, train, known, passed, in_world)
    log.info(
        "prompts (self_instruct): %d of %d candidates kept; dropped %s",
        len(chunk),
        info["candidates"],
        info["dropped"],
    )
    return chunk, {"synthetic": info}
