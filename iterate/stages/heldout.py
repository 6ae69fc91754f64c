"""The run's held-out set, made once by the loop before iteration 0 (``<run>/heldout/``):

- ``prompts``: the held-out prompts, drawn once from the source and from then on read from
  here whatever the source holds now (the prompts stage never draws them again);
- ``initial_samples``: the initial policy's samples of them (``heldout/initial_samples/``),
  the baseline every iteration's win rate is measured against.

``sample`` is how both the initial and each new policy's held-out samples are drawn (the
evaluate stage uses it for the new policy's).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pyarrow as pa

from iterate import models, sampling, seeds
from iterate.config import Config
from iterate.paths import Paths
from iterate.shards import SCHEMAS, read_shards, shard_path, write_plan, write_shard
from iterate.stage import Stage, counted
from iterate.stages import prompts as sources


def prompts(cfg: Config, paths: Paths) -> pa.Table:
    """The held-out prompts of the run: drawn once, written to ``<run>/heldout/``, and from
    then on read from there whatever the source holds now."""
    stage = Stage(paths.heldout_dir, "heldout", sources.heldout_config(cfg))
    if not stage.check(cfg.force):
        _, held, dropped, source, fields = sources.pools(cfg)
        write_shard(sources.table(held, fields), shard_path(stage.path, 0))
        stage.finish(rows_out=len(held), dropped=dict(dropped), **source)
    return read_shards(stage.path)


def params(cfg: Config) -> sampling.Params:
    return sampling.Params(
        n=cfg.evaluate.samples, temperature=1.0, top_p=1.0, max_tokens=cfg.generate.max_tokens
    )


def sample(
    cfg: Config, tok, heldout: pa.Table, out: Path, unit: int, put: Callable
) -> tuple[pa.Table, dict]:
    """Samples of the held-out prompts as shards in ``out`` (resumable; a shard seeded from
    (seed, unit, shard)), from the policy ``put(sampler)`` gives the sampler; returns them
    and what was dropped."""
    gc = cfg.generate
    shards, dropped = sampling.plan(
        tok, heldout, cfg.model.max_length - gc.max_tokens, gc.shard_size
    )
    timings = {}
    write_plan(out, "shards", len(shards))
    if todo := sampling.missing(shards, out):
        with sampling.session(cfg) as sampler:
            put(sampler)
            sampling.write_shards(
                sampler,
                todo,
                params(cfg),
                lambda k: seeds.derive("heldout", cfg.seed, unit, k),
                out,
                (unit - 1, "evaluate"),
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
        stage.finish(rows_out=table.num_rows, **info, **sampling.summary(table))
    return read_shards(stage.path, SCHEMAS["generate"])
