"""Turn the n rewards of each prompt into a preference pair (or RAFT's best response).

The rules are small pure functions of one prompt's rewards. Non-finite rewards do not
count as valid; prompts with fewer than two valid responses, ties and pairs below the
minimum margin are dropped and counted by reason.
"""

from __future__ import annotations

import math
import random
from collections import Counter

import pandas as pd
import pyarrow as pa

from iterate import progress
from iterate.config import Config
from iterate.store import shards
from iterate.store.paths import Paths
from iterate.store.shards import SCHEMAS, shard_path
from iterate.store.stage import Stage, counted
from iterate.train.rules import rule


def _valid(rewards: list[float]) -> list[int]:
    return [i for i, r in enumerate(rewards) if r is not None and math.isfinite(r)]


def best(rewards: list[float]) -> int | str:
    """RAFT: index of the highest reward (lowest index on ties for the highest), or a drop
    reason. A prompt whose valid responses all score alike is dropped as a ``tie``: none of
    them is better, and imitating an arbitrary one teaches the policy its own mistakes (under
    a 0/1 correctness reward most prompts of a weak policy have no right answer at all)."""
    valid = _valid(rewards)
    if not valid:
        return "no_valid_response"
    if len(valid) > 1 and len({rewards[i] for i in valid}) == 1:
        return "tie"
    return max(valid, key=lambda i: (rewards[i], -i))


def select(
    rewards: list[float], rule: str, rng: random.Random, min_margin: float = 0.0
) -> tuple[int, int] | str:
    """(chosen, rejected) indices under ``rule``, or the reason the prompt is dropped.

    - ``max_min``: best vs worst (the GSHF default);
    - ``max_random``: best vs a random other response;
    - ``max_max``: best vs second best;
    - ``random``: two random responses, the higher-rewarded one chosen.
    """
    valid = _valid(rewards)
    if len(valid) < 2:
        return "fewer_than_two_valid"
    ranked = sorted(valid, key=lambda i: (-rewards[i], i))  # best first, stable on ties
    if rule == "max_min":
        c, r = ranked[0], ranked[-1]
    elif rule == "max_max":
        c, r = ranked[0], ranked[1]
    elif rule == "max_random":
        c, r = ranked[0], rng.choice(ranked[1:])
    elif rule == "random":
        a, b = rng.sample(valid, 2)
        c, r = (a, b) if (rewards[a], -a) >= (rewards[b], -b) else (b, a)
    else:
        raise ValueError(f"unknown pair rule {rule!r}")
    if rewards[c] == rewards[r]:
        return "tie"
    if rewards[c] - rewards[r] < min_margin:
        return "below_margin"
    return c, r


def _config(cfg: Config) -> dict:
    return {
        "pairs": counted(cfg, "pairs"),
        "mode": "best" if rule(cfg.update.name).keep == "best" else "pairs",
        "seed": cfg.seed,
    }


def pairs_of(cfg: Config, i: int, df: pd.DataFrame, dropped: Counter) -> list[dict]:
    """The pairs (or RAFT's best responses) of the prompts in ``df`` (their samples joined
    with their labels), in the prompts' order; the prompts dropped are counted in
    ``dropped``."""
    pc, best_only = cfg.pairs, rule(cfg.update.name).keep == "best"
    df["score"] = df["reward"] - pc.length_penalty * df["response_tokens"]
    out = []
    for pid, g in df.groupby("prompt_id", sort=False):
        g = g.sort_values("sample_idx")
        scores = [None if pd.isna(s) else float(s) for s in g["score"]]
        rng = random.Random(f"{cfg.seed}:{i}:{pid}")
        pick = best(scores) if best_only else select(scores, str(pc.rule), rng, pc.min_margin)
        if isinstance(pick, str):
            dropped[pick] += 1
            continue
        c, r = (pick, None) if best_only else pick
        rows = g.to_dict("records")
        out.append(
            {
                "prompt_id": pid,
                "prompt": rows[c]["prompt"],
                "chosen": rows[c]["response"],
                "rejected": None if r is None else rows[r]["response"],
                "chosen_idx": int(rows[c]["sample_idx"]),
                "rejected_idx": None if r is None else int(rows[r]["sample_idx"]),
                "chosen_reward": float(rows[c]["reward"]),
                "rejected_reward": None if r is None else float(rows[r]["reward"]),
                "chosen_ids": list(rows[c]["response_ids"]),
                "rejected_ids": None if r is None else list(rows[r]["response_ids"]),
            }
        )
    return out


def run(cfg: Config, paths: Paths, i: int) -> dict:
    """Shard by shard: a generate shard holds every sample of its prompts, so its pairs need
    only it and its label shard, and pairs shard k is made from them (memory bounded by a
    shard, whatever the iteration's size)."""
    stage = Stage(paths.stage(i, "pairs"), "pairs", _config(cfg), inputs=[paths.stage(i, "label")])
    if stage.check(cfg.force):
        return stage.read_done()
    gen_dir, lab_dir = paths.stage(i, "generate"), paths.stage(i, "label")
    dropped, best_rewards, margins, prompts_in, rows_out = Counter(), [], [], 0, 0
    paths_in = shards.shard_paths(gen_dir)
    bar = progress.bar(len(paths_in), "pairs", "shard")
    for gen_path in paths_in:
        k = shards.shard_index(gen_path)
        gen = shards.read_shard(gen_path).to_pandas()
        lab = shards.read_shard(shard_path(lab_dir, k)).to_pandas()
        df = gen.merge(lab, on=["prompt_id", "sample_idx"], how="left")
        out = pairs_of(cfg, i, df, dropped)
        table = pa.Table.from_pylist(out, schema=SCHEMAS["pairs"])
        shards.write_shard(table, shard_path(stage.path, k))
        prompts_in += int(df["prompt_id"].nunique())
        rows_out += len(out)
        best_rewards += df.groupby("prompt_id", sort=False)["reward"].max().dropna().tolist()
        margins += [
            o["chosen_reward"] - o["rejected_reward"]
            for o in out
            if o["rejected_reward"] is not None
        ]
        bar.update(1)
    bar.close()
    return stage.finish(
        mode=_config(cfg)["mode"],
        prompts_in=prompts_in,
        rows_out=rows_out,
        dropped=dict(dropped),
        reward_best_mean=round(sum(best_rewards) / len(best_rewards), 4) if best_rewards else None,
        margin_mean=round(sum(margins) / len(margins), 4) if margins else None,
    )
