"""Reward-model refresh between iterations (``reward.refresh.pairs`` > 0): the reward model
learns the current policy's own samples before it labels them.

A reward model trained once, on another policy's responses, is wrong where the policy goes
next; the policy then climbs its errors (reward over-optimisation). Per iteration, after
generate and before label (``iter_i/reward/``):

1. ``pairs`` prompts of the iteration are drawn (seeded); the current reward model ranks
   each prompt's n samples and ``rule`` (``pairs.select``) picks the two the judge sees,
   by default its best and its worst: the pair DPO would train on;
2. a judge labels them: the toy world's gold judge, a judge model scored like a reward
   model, or the user's own labels for the iteration (a preference file);
3. every member of the reward model goes on training (a fresh LoRA adapter, merged) on
   the new pairs with ``replay`` times as many earlier ones (the reward model's own
   training pairs and earlier refreshes' pairs) mixed in, so it does not forget.

A fifth of the judged pairs is kept apart to measure the model before and after. Written:
``pairs.parquet`` (the judged pairs, read by later refreshes), ``model/``, and in
``_DONE.json`` how often the reward model agreed with the judge on all the new pairs before
the refresh (``rm_agreement_before``: its accuracy where the policy is now) and on the kept
fifth before and after (``judged_heldout_accuracy_before`` / ``_after``).
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq

from iterate import faults, preferences, rewards
from iterate.config import Config, plain
from iterate.preferences import Pair
from iterate.rewards.scorer import members
from iterate.stages import pairs
from iterate.stages.reward_model import build_pairs, fit_members
from iterate.store.paths import Paths
from iterate.store.shards import SCHEMAS, atomic_write_json, read_json, read_shards, write_shard
from iterate.store.stage import Stage, counted
from iterate.train import models
from iterate.train.models import as_messages

log = logging.getLogger(__name__)

JUDGED = pa.schema(
    [
        ("prompt", pa.string()),
        ("chosen", pa.string()),
        ("rejected", pa.string()),
        ("rm_agreed", pa.bool_()),  # the reward model before the refresh preferred `chosen`
    ]
)


def ranker(cfg: Config, rm_path: str) -> rewards.Reward:
    """The reward model being refreshed, as it ranks the samples before the refresh."""
    return rewards.of(cfg, "model", path=rm_path, device=models.device(str(cfg.device)))


def judged_pairs(cfg: Config, paths: Paths, i: int, rm_path: str) -> tuple[list[dict], Counter]:
    """The iteration's pairs the judge labelled: two samples of each drawn prompt, picked by
    the current reward model under ``rule``, ordered by the judge; ties dropped, counted."""
    fc, dropped = cfg.reward.refresh, Counter()
    if str(fc.judge) == "file":
        path = fc.path.format(iteration=i)
        got, _, _ = preferences.load(path, 1.0, cfg.seed, "reward.refresh.path")
        r = ranker(cfg, rm_path).score(
            [p.messages for p in got for _ in (0, 1)],
            [x for p in got for x in (p.chosen, p.rejected)],
        )
        rows = [
            {
                "prompt": json.dumps(p.messages),
                "chosen": p.chosen,
                "rejected": p.rejected,
                "rm_agreed": r[2 * k] > r[2 * k + 1],
            }
            for k, p in enumerate(got)
        ]
        return rows[: fc.pairs], dropped
    columns = ["prompt_id", "sample_idx", "prompt", "response"]  # not the token ids
    gen = read_shards(paths.stage(i, "generate"), SCHEMAS["generate"], columns).to_pandas()
    ids = sorted(gen["prompt_id"].unique())
    rng = random.Random(f"{cfg.seed}:refresh:{i}")
    chosen_ids = set(rng.sample(ids, min(fc.pairs, len(ids))))
    gen = gen[gen["prompt_id"].isin(chosen_ids)].sort_values(["prompt_id", "sample_idx"])
    ranks = ranker(cfg, rm_path).score(gen["prompt"].tolist(), gen["response"].tolist(), "rank")
    gen["reward"] = ranks
    picked = []
    for _, g in gen.groupby("prompt_id", sort=True):
        pick = pairs.select(g["reward"].tolist(), str(fc.rule), rng)
        if isinstance(pick, str):
            dropped[pick] += 1
            continue
        a, b = (g.iloc[k] for k in pick)  # a: the reward model's choice
        picked.append((a["prompt"], a["response"], b["response"]))
    judge = rewards.of(cfg, "judge", device=models.device(str(cfg.device)))
    scores = judge.score(
        [p for p, _, _ in picked for _ in (0, 1)],
        [x for _, a, b in picked for x in (a, b)],
        desc="judge",
    )
    rows = []
    for k, (prompt, a, b) in enumerate(picked):
        sa, sb = scores[2 * k], scores[2 * k + 1]
        if sa == sb:
            dropped["judge_tie"] += 1
            continue
        chosen, rejected = (a, b) if sa > sb else (b, a)
        rows.append(
            {"prompt": prompt, "chosen": chosen, "rejected": rejected, "rm_agreed": sa > sb}
        )
    return rows, dropped


def as_pairs(rows: list[dict]) -> list[Pair]:
    return [Pair(as_messages(r["prompt"]), r["chosen"], r["rejected"]) for r in rows]


def replay_pool(cfg: Config, paths: Paths, i: int) -> list[Pair]:
    """What the reward model learnt before: its training pairs (when trained here) and the
    pairs of this run's earlier refreshes."""
    base = cfg.reward.base or paths.base_policy
    old = build_pairs(cfg, paths, base)[0] if cfg.reward.train else []
    for j in range(i):
        f = paths.judged_pairs(j)
        if f.exists():
            old += as_pairs(pq.read_table(f).to_pylist())
    return old


def run(cfg: Config, paths: Paths, i: int, rm_path: str) -> dict:
    """Refresh the reward model on iteration i's samples; ``_DONE.json`` names the new one
    (``reward_model``), which labels this iteration and is refreshed by the next."""
    rc, fc = cfg.reward, cfg.reward.refresh
    conf = {
        "refresh": counted(cfg, "reward.refresh"),
        "reward": ranker(cfg, rm_path).identity(),  # how the samples are ranked
        "train": {
            k: v
            for k, v in plain(rc).items()
            if k in ("lora", "batch_size", "grad_accum", "lr", "ensemble")
        },
        "seed": cfg.seed,
    }
    inputs = [paths.stage(i, "generate"), *ranker(cfg, rm_path).inputs()]
    stage = Stage(paths.stage(i, "reward"), "reward", conf, inputs=inputs)
    if stage.check(cfg.force):
        return stage.read_done()
    out = paths.judged_pairs(i)
    if not out.exists():
        rows, dropped = judged_pairs(cfg, paths, i, rm_path)
        atomic_write_json(stage.path / "dropped.json", dict(dropped))
        write_shard(pa.Table.from_pylist(rows, schema=JUDGED), out)  # last: the marker
        faults.point(i, "reward", 1)  # the judged pairs are kept: a rerun does not judge again
    rows = pq.read_table(out).to_pylist()
    dropped = read_json(stage.path / "dropped.json")
    new = as_pairs(rows)
    before = sum(r["rm_agreed"] for r in rows) / max(1, len(rows))
    if len(new) < 2:  # nothing to learn from: the reward model stays as it is
        log.warning(
            "reward refresh %d: %d judged pairs (%s): the reward model is kept",
            i,
            len(new),
            dropped,
        )
        return stage.finish(
            reward_model=rm_path,
            judged_pairs=len(rows),
            dropped=dropped,
            replayed_pairs=0,
            rm_agreement_before=round(before, 4),
            judged_heldout_accuracy_before=None,
            judged_heldout_accuracy_after=None,
            steps=0,
        )
    held_n = max(1, len(new) // 5)  # a fifth kept apart: the refreshed model's accuracy on them
    train_new, held_new = new[held_n:], new[:held_n]
    pool = replay_pool(cfg, paths, i)
    rng = random.Random(f"{cfg.seed}:replay:{i}")
    replay = rng.sample(pool, min(len(pool), round(fc.replay * len(train_new))))
    starts, _ = members(rm_path)
    fitted = fit_members(
        rc,
        starts,
        paths.refreshed_reward_model(i),
        train_new + replay,
        held_new,
        cfg.seed + 7919 * (i + 1),
        fc.epochs,
        fc.lr or rc.lr,
        False,
        (i, "reward_member"),
    )
    # the old model's accuracy on the kept fifth: it agreed with the judge or it did not
    held_before = sum(r["rm_agreed"] for r in rows[:held_n]) / held_n
    done = stage.finish(
        reward_model=str(paths.refreshed_reward_model(i)),
        judged_pairs=len(rows),
        dropped=dropped,
        replayed_pairs=len(replay),
        rm_agreement_before=round(before, 4),
        judged_heldout_accuracy_before=round(held_before, 4),
        judged_heldout_accuracy_after=fitted["heldout_accuracy"],
        steps=fitted["steps"],
    )
    log.info(
        "reward refresh %d: %d judged pairs (reward model agreed on %.2f), held-out %.2f -> %.2f",
        i,
        len(rows),
        before,
        held_before,
        fitted["heldout_accuracy"],
    )
    return done
