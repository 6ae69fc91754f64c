"""The label stage: every generated response scored by the reward model (and, in the toy
world, by the gold judge).

Scoring goes through the one scorer (``scoring.Scorer``): each response re-rendered in
the reward model's own chat template, length-sorted batches of ``reward.score_batch_size``.
Label shard ``k`` labels generate shard ``k``; existing shards are skipped. Non-finite
rewards are counted and their rows dropped, never turned into 0.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from iterate import faults, models
from iterate.config import Config
from iterate.paths import Paths
from iterate.scoring import ScorerPool, aggregation
from iterate.shards import (
    SCHEMAS,
    atomic_write_json,
    read_shards,
    shard_index,
    shard_path,
    shard_paths,
    write_shard,
)
from iterate.stage import Stage
from iterate.toy.world import gold_scorer

log = logging.getLogger(__name__)


def label_table(
    gen: pa.Table, rewards: list[float], gold=None, spread: list | None = None
) -> tuple[pa.Table, Counter]:
    """The label rows of generate shard ``gen`` given its rewards (and an ensemble's
    disagreement); non-finite ones dropped."""
    prompts, responses = gen["prompt"].to_pylist(), gen["response"].to_pylist()
    keep = [i for i, r in enumerate(rewards) if r is not None and math.isfinite(r)]
    refused = sum(r is None for r in rewards)
    dropped = +Counter(  # only the reasons that occurred
        {"template_refused": refused, "non_finite_reward": len(rewards) - len(keep) - refused}
    )
    table = pa.table(
        {
            "prompt_id": [gen["prompt_id"][i].as_py() for i in keep],
            "sample_idx": [gen["sample_idx"][i].as_py() for i in keep],
            "reward": [rewards[i] for i in keep],
            "gold": [gold(prompts[i], responses[i]) if gold else None for i in keep],
            "reward_std": [spread[i] if spread else None for i in keep],
        },
        schema=SCHEMAS["label"],
    )
    return table, dropped


def run(cfg: Config, paths: Paths, i: int, rm_path: str) -> dict:
    rc = cfg.reward
    gen_dir = paths.stage(i, "generate")
    made_by = Path(rm_path).parent  # the stage that trained or refreshed it, if any
    rm_stage = [made_by] if (made_by / "_DONE.json").exists() else []
    conf = {"reward_model": rm_path, "max_length": rc.max_length, "dtype": str(rc.dtype)}
    conf["chat_template"] = rc.chat_template
    conf.update(aggregation(rc, rm_path))
    stage = Stage(paths.stage(i, "label"), "label", conf, inputs=[gen_dir, *rm_stage])
    if stage.check(cfg.force):
        return stage.read_done()
    todo = [p for p in shard_paths(gen_dir) if not shard_path(stage.path, shard_index(p)).exists()]
    if todo:
        gold = gold_scorer(cfg.prompts.source)
        gens: dict[int, pa.Table] = {}  # the shards being scored: one per worker at a time

        def texts(k: int) -> tuple[list, list]:
            g = gens[k] = pq.read_table(shard_path(gen_dir, k))
            return g["prompt"].to_pylist(), g["response"].to_pylist()

        def write(k: int, scored: tuple[list, list]) -> None:
            table, d = label_table(gens.pop(k), scored[0], gold, scored[1])
            write_shard(table, shard_path(stage.path, k))
            _save_counts(stage.path, k, d)  # after the shard: a crash between rewrites both
            faults.point(i, "label", k + 1)

        with ScorerPool(rc, rm_path, models.device(str(cfg.device))) as pool:
            keys = [shard_index(p) for p in todo]
            pool.score_each(keys, texts, write, desc="label", spread=True)
    dropped = json_counts(stage.path)
    labels = read_shards(stage.path, SCHEMAS["label"])
    rewards = labels["reward"].to_pylist()
    gold = [g for g in labels["gold"].to_pylist() if g is not None]
    stds = labels["reward_std"].to_pylist() if "reward_std" in labels.column_names else []
    spread = [s for s in stds if s is not None]
    return stage.finish(
        reward_model=rm_path,
        rows_in=sum(pq.read_metadata(p).num_rows for p in shard_paths(gen_dir)),
        rows_out=labels.num_rows,
        dropped=dict(dropped),
        reward_mean=round(sum(rewards) / max(1, len(rewards)), 4),
        gold_mean=round(sum(gold) / len(gold), 4) if gold else None,
        reward_std_mean=round(sum(spread) / len(spread), 4) if spread else None,
    )


# Dropped counts per shard live beside the shards, so a resumed stage still reports them.
def _save_counts(folder: Path, k: int, counts: Counter) -> None:
    if counts:
        atomic_write_json(folder / f"dropped_{k:05d}.json", dict(counts))


def json_counts(folder: Path) -> Counter:
    total = Counter()
    for p in sorted(Path(folder).glob("dropped_*.json")):
        total += Counter(json.loads(p.read_text()))
    return total
