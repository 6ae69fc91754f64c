"""The generate stage: best-of-n samples of the iteration's prompts, as Parquet shards.

One request per prompt with ``n`` samples (the prompt is prefilled once), through the run's
sampler (``iterate.sampling.samplers``; vLLM or transformers by ``generate.backend``). Prompts whose
tokens leave no room for ``max_tokens`` within ``model.max_length`` are dropped and
counted, never allowed to fail the batch. Shard ``k`` holds prompts
``[k*shard_size, (k+1)*shard_size)`` and is seeded from (seed, iteration, k); shards
already on disk are kept, so a crash costs at most the shard being written.
"""

from __future__ import annotations

import logging

import pyarrow as pa

from iterate.config import Config
from iterate.errors import BadInput
from iterate.sampling import samplers
from iterate.store import seeds
from iterate.store.paths import Paths
from iterate.store.shards import SCHEMAS, read_shards, write_plan
from iterate.store.stage import Stage, counted
from iterate.train import models

log = logging.getLogger(__name__)


def params(cfg: Config) -> samplers.Params:
    gc = cfg.generate
    return samplers.Params(
        n=gc.n, temperature=gc.temperature, top_p=gc.top_p, max_tokens=gc.max_tokens
    )


def run(cfg: Config, paths: Paths, i: int, policy: str, prompts: pa.Table) -> dict:
    gc = cfg.generate
    conf = {
        "generate": counted(cfg, "generate"),
        "model": counted(cfg, "model"),
        "policy": policy,
        "seed": cfg.seed,
    }
    stage = Stage(
        paths.stage(i, "generate"),
        "generate",
        conf,
        inputs=[paths.stage(i, "prompts"), *paths.previous(i)],
    )
    if stage.check(cfg.force):
        return stage.read_done()
    tok = models.load_tokenizer(policy, cfg.model.chat_template)
    shards, dropped = samplers.plan(
        tok, prompts, cfg.model.max_length - gc.max_tokens, gc.shard_size
    )
    if not shards:
        raise BadInput(
            f"generate: all {prompts.num_rows} prompts dropped ({dict(dropped)}): "
            f"model.max_length ({cfg.model.max_length}) leaves no room for "
            f"generate.max_tokens ({gc.max_tokens}) after the prompt"
        )
    write_plan(stage.path, "shards", len(shards))
    todo = samplers.missing(shards, stage.path)
    timings = {}
    if todo:
        log.info("generate: %d of %d shards to write (%s)", len(todo), len(shards), gc.backend)
        with samplers.session(cfg) as sampler:
            sampler.load(policy)
            samplers.write_shards(
                sampler,
                todo,
                params(cfg),
                lambda k: seeds.derive("generate", cfg.seed, i, k),
                stage.path,
                (i, "generate"),
                f"generate ({gc.backend})",
            )
            timings = sampler.timings
    table = read_shards(stage.path, SCHEMAS["generate"], samplers.SUMMARY_COLUMNS)
    return stage.finish(
        backend=str(gc.backend),
        prompts_in=prompts.num_rows,
        prompts_out=prompts.num_rows - sum(dropped.values()),
        rows_out=table.num_rows,
        dropped=dict(dropped),
        shards=len(shards),
        timings=timings,
        **samplers.summary(table),
    )
