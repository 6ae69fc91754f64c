"""The label stage: every generated response scored by the run's reward (``rewards.of``:
a reward model, a function, a mixture, whose sources' rewards get columns of their own, a
pairwise model or a generative judge, whose every answer is kept in ``judgements/``), and
by its gold judge when it has one (the toy world's).

A reward model scores through the one scorer (``scoring.Scorer``): each response
re-rendered in the reward model's own chat template, length-sorted batches of
``reward.score_batch_size``, shards dealt out among ``reward.workers`` processes.
Label shard ``k`` labels generate shard ``k``; existing shards are skipped. Non-finite
rewards are counted and their rows dropped, never turned into 0.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from iterate import faults, rewards
from iterate.config import Config
from iterate.rewards.pool import RewardPool
from iterate.store.paths import Paths
from iterate.store.shards import (
    SCHEMAS,
    atomic_write_json,
    read_json,
    read_shards,
    shard_index,
    shard_path,
    shard_paths,
    write_shard,
)
from iterate.store.stage import Stage
from iterate.train import models

log = logging.getLogger(__name__)


def label_table(
    gen: pa.Table,
    rewards: list[float],
    gold: list | None = None,
    spread: list | None = None,
    parts: dict[str, list] | None = None,
    unscored: str = "non_finite_reward",
) -> tuple[pa.Table, Counter]:
    """The label rows of generate shard ``gen`` given its rewards (and the gold judge's
    scores, an ensemble's disagreement, a mixture's sources' rewards in columns
    ``source_<name>``); rows without a finite reward dropped, counted by reason
    (``unscored``; for a mixture, naming the first source that gave none)."""
    parts, keep, dropped = parts or {}, [], Counter()
    for i, r in enumerate(rewards):
        if r is None:
            dropped["template_refused"] += 1
        elif not math.isfinite(r):
            bad = [n for n, v in parts.items() if v[i] is None or not math.isfinite(v[i])]
            dropped[unscored + (f"_{bad[0]}" if bad else "")] += 1
        else:
            keep.append(i)
    columns = {
        "prompt_id": [gen["prompt_id"][i].as_py() for i in keep],
        "sample_idx": [gen["sample_idx"][i].as_py() for i in keep],
        "reward": [rewards[i] for i in keep],
        "gold": [gold[i] if gold else None for i in keep],
        "reward_std": [spread[i] if spread else None for i in keep],
    }
    schema = SCHEMAS["label"]
    for name, values in parts.items():
        columns[f"{SOURCE}{name}"] = [values[i] for i in keep]
        schema = schema.append(pa.field(f"{SOURCE}{name}", pa.float64()))
    return pa.table(columns, schema=schema), dropped


SOURCE = "source_"  # a mixture source's column in the label shards: source_<name>


def gold_agreement(labels: pa.Table, column: str) -> float | None:
    """How often ``column`` orders two samples of a prompt as the gold judge does, over the
    pairs the gold judge tells apart (None without gold scores)."""
    by_prompt: dict[str, list] = {}
    for pid, v, g in zip(
        labels["prompt_id"].to_pylist(), labels[column].to_pylist(), labels["gold"].to_pylist()
    ):
        if g is not None and v is not None:
            by_prompt.setdefault(pid, []).append((v, g))
    agree = total = 0
    for rows in by_prompt.values():
        for a in range(len(rows)):
            for b in range(a + 1, len(rows)):
                (va, ga), (vb, gb) = rows[a], rows[b]
                if ga != gb:
                    total += 1
                    agree += (va - vb) * (ga - gb) > 0
    return round(agree / total, 4) if total else None


def source_stats(labels: pa.Table, weights: dict[str, float]) -> dict[str, dict]:
    """Per source of a mixture (and for the reward itself, ``reward``): weight, mean and
    std of its rewards on the kept rows, and its agreement with the gold judge."""
    out = {}
    for name, w in {"reward": None, **weights}.items():
        column = "reward" if w is None else f"{SOURCE}{name}"
        values = [v for v in labels[column].to_pylist() if v is not None]
        n = max(1, len(values))
        mean = sum(values) / n
        out[name] = {
            **({"weight": w} if w is not None else {}),
            "mean": round(mean, 4),
            "std": round((sum((v - mean) ** 2 for v in values) / n) ** 0.5, 4),
            "gold_agreement": gold_agreement(labels, column),
        }
    return out


JUDGEMENTS = "judgements"  # a generative judge's answers: label/judgements/shard_k.parquet


def judgement_table(gen: pa.Table, said: list) -> pa.Table:
    """A generative judge's answers on generate shard ``gen`` (``judge.Judgement``: the rows
    it was shown by index), one row per answer: the prompt, the samples shown first and
    second (-1: none, a score), the attempt, the text and what it parsed to (null: nothing;
    compare: 1 when the sample shown first won, 0 when the second did, 0.5 a tie)."""
    ids, idx = gen["prompt_id"].to_pylist(), gen["sample_idx"].to_pylist()
    return pa.table(
        {
            "prompt_id": [ids[j.first] for j in said],
            "first_idx": [idx[j.first] for j in said],
            "second_idx": [idx[j.second] if j.second >= 0 else -1 for j in said],
            "attempt": [j.attempt for j in said],
            "text": [j.text for j in said],
            "verdict": [j.verdict for j in said],
        },
        schema=SCHEMAS["judgement"],
    )


def judge_stats(folder: Path) -> dict:
    """How a generative judge's answers went: questions asked, answers sampled, the share
    parsed at the first attempt, and the questions left unjudged after every retry."""
    t = read_shards(folder, SCHEMAS["judgement"])
    first = [v for a, v in zip(t["attempt"].to_pylist(), t["verdict"].to_pylist()) if a == 0]
    last: dict[tuple, float | None] = {}  # each question's final answer
    for q in zip(
        t["prompt_id"].to_pylist(),
        t["first_idx"].to_pylist(),
        t["second_idx"].to_pylist(),
        t["verdict"].to_pylist(),
    ):
        last[q[:3]] = q[3]
    unjudged = sum(v is None for v in last.values())
    return {
        "questions": len(last),
        "answers": t.num_rows,
        "parsed_first_try": round(sum(v is not None for v in first) / max(1, len(first)), 4),
        "unjudged": unjudged,
    }


def run(cfg: Config, paths: Paths, i: int, rm_path: str) -> dict:
    gen_dir = paths.stage(i, "generate")
    reward = rewards.of(cfg, path=rm_path, device=models.device(str(cfg.device)), run=paths.run)
    gold = rewards.of(cfg, "gold")
    stage = Stage(
        paths.stage(i, "label"), "label", reward.identity(), inputs=[gen_dir, *reward.inputs()]
    )
    if stage.check(cfg.force):
        return stage.read_done()
    todo = [p for p in shard_paths(gen_dir) if not shard_path(stage.path, shard_index(p)).exists()]
    if todo:
        gens: dict[int, pa.Table] = {}  # the shards being scored: one per worker at a time

        def texts(k: int) -> tuple[list, list]:
            gens[k] = pq.read_table(shard_path(gen_dir, k))
            return texts_of(gens[k])

        def write(k: int, scored: rewards.Scored) -> None:
            gen = gens.pop(k)
            judged = gold.score(*texts_of(gen)) if gold else None
            table, d = label_table(
                gen,
                scored.rewards,
                judged,
                scored.spreads,
                scored.parts,
                "unjudged" if scored.judgements else "non_finite_reward",
            )
            if scored.judgements:  # before the label shard: its existence is the shard's end
                write_shard(
                    judgement_table(gen, scored.judgements), shard_path(stage.path / JUDGEMENTS, k)
                )
            write_shard(table, shard_path(stage.path, k))
            _save_counts(stage.path, k, d)  # after the shard: a crash between rewrites both
            faults.point(i, "label", k + 1)

        with RewardPool(reward, cfg.reward.workers, cfg.reward.threads) as pool:
            keys = [shard_index(p) for p in todo]
            pool.score_each(keys, texts, write, desc="label", detail=True)
    dropped = json_counts(stage.path)
    labels = read_shards(stage.path, SCHEMAS["label"])
    scores = labels["reward"].to_pylist()
    golds = [g for g in labels["gold"].to_pylist() if g is not None]
    stds = labels["reward_std"].to_pylist() if "reward_std" in labels.column_names else []
    spread = [s for s in stds if s is not None]
    weights = {n: w for n, _, w in getattr(reward, "parts", [])}
    said = stage.path / JUDGEMENTS
    return stage.finish(
        reward_model=rm_path,
        rows_in=sum(pq.read_metadata(p).num_rows for p in shard_paths(gen_dir)),
        rows_out=labels.num_rows,
        dropped=dict(dropped),
        reward_mean=round(sum(scores) / len(scores), 4) if scores else None,  # (all dropped)
        gold_mean=round(sum(golds) / len(golds), 4) if golds else None,
        reward_std_mean=round(sum(spread) / len(spread), 4) if spread else None,
        sources=source_stats(labels, weights) if labels.num_rows else {},
        **({"judge": judge_stats(said)} if shard_paths(said) else {}),
    )


def texts_of(gen: pa.Table) -> tuple[list, list]:
    """A generate shard's prompts and responses."""
    return gen["prompt"].to_pylist(), gen["response"].to_pylist()


# Dropped counts per shard live beside the shards, so a resumed stage still reports them.
def _save_counts(folder: Path, k: int, counts: Counter) -> None:
    if counts:
        atomic_write_json(folder / f"dropped_{k:05d}.json", dict(counts))


def json_counts(folder: Path) -> Counter:
    total = Counter()
    for p in sorted(Path(folder).glob("dropped_*.json")):
        total += Counter(read_json(p))
    return total
