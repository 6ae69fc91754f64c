"""Pair rules on one prompt's rewards: picks, ties, too few valid responses, NaN, margins."""

import math
import random
import shutil

import pytest

from iterate.stages.pairs import best, select

NAN = float("nan")


def rng():
    return random.Random(0)


@pytest.mark.parametrize(
    ("rule", "expected"),
    [("max_min", (1, 3)), ("max_max", (1, 0))],
)
def test_deterministic_rules(rule, expected):
    assert select([0.5, 2.0, 0.1, -1.0], rule, rng()) == expected


def test_max_random_chooses_best_and_any_other():
    seen = set()
    for s in range(50):
        c, r = select([0.5, 2.0, 0.1, -1.0], "max_random", random.Random(s))
        assert c == 1 and r != 1
        seen.add(r)
    assert seen == {0, 2, 3}


def test_random_orders_the_two_by_reward():
    for s in range(50):
        c, r = select([0.5, 2.0, 0.1, -1.0], "random", random.Random(s))
        assert [0.5, 2.0, 0.1, -1.0][c] > [0.5, 2.0, 0.1, -1.0][r]


@pytest.mark.parametrize("rule", ["max_min", "max_max", "max_random", "random"])
def test_all_equal_is_a_tie(rule):
    assert select([1.0, 1.0, 1.0], rule, rng()) == "tie"


def test_max_max_tie_between_top_two():
    assert select([3.0, 3.0, 1.0], "max_max", rng()) == "tie"
    assert select([3.0, 3.0, 1.0], "max_min", rng()) == (0, 2)  # lowest index wins a tied best


@pytest.mark.parametrize("rule", ["max_min", "max_max", "max_random", "random"])
@pytest.mark.parametrize(
    "rewards", [[], [1.0], [NAN, 2.0], [NAN, NAN, NAN], [None, 1.0], [math.inf * 0, 3.0]]
)
def test_fewer_than_two_valid(rule, rewards):
    assert select(rewards, rule, rng()) == "fewer_than_two_valid"


def test_nan_and_inf_are_never_picked():
    rewards = [NAN, 1.0, math.inf, 0.0, -math.inf]
    assert select(rewards, "max_min", rng()) == (1, 3)
    for s in range(20):
        c, r = select(rewards, "random", random.Random(s))
        assert {c, r} <= {1, 3}


def test_min_margin():
    assert select([1.0, 0.8], "max_min", rng(), min_margin=0.5) == "below_margin"
    assert select([1.0, 0.4], "max_min", rng(), min_margin=0.5) == (0, 1)


def test_raft_best():
    assert best([0.1, 0.9, 0.9, NAN]) == 1
    assert best([NAN, None]) == "no_valid_response"
    assert best([-2.0]) == 0
    assert best([0.0, 0.0, 0.0, NAN]) == "tie"  # nothing better to imitate
    assert best([0.0, 1.0, 1.0, 0.0]) == 1


def test_unknown_rule():
    with pytest.raises(ValueError, match="unknown pair rule"):
        select([1.0, 0.0], "min_max", rng())


def test_the_length_penalty_picks_by_reward_less_length_but_records_the_reward(tmp_path):
    """``pairs.length_penalty``: the pair is chosen by reward - penalty x response tokens;
    the rows keep the reward model's own rewards."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from iterate.stages import pairs
    from iterate.store.paths import Paths
    from iterate.store.shards import SCHEMAS, shard_path, write_shard

    from .conftest import compose_cfg

    paths = Paths(run=tmp_path, base_policy="p")
    samples = [("long", 1.0, 20), ("short", 0.8, 5), ("mid", 0.0, 8)]  # (text, reward, tokens)
    n = len(samples)
    gen = {
        "prompt_id": ["a"] * n,
        "sample_idx": list(range(n)),
        "prompt": ["Q?"] * n,
        "response": [t for t, _, _ in samples],
        "prompt_tokens": [2] * n,
        "response_tokens": [k for _, _, k in samples],
        "finish_reason": ["stop"] * n,
        "response_ids": [[1] * k for _, _, k in samples],
    }
    write_shard(
        pa.table(gen, schema=SCHEMAS["generate"]), shard_path(paths.stage(0, "generate"), 0)
    )
    lab = {
        "prompt_id": ["a"] * n,
        "sample_idx": list(range(n)),
        "reward": [r for _, r, _ in samples],
        "gold": [None] * n,
        "reward_std": [None] * n,
    }
    write_shard(pa.table(lab, schema=SCHEMAS["label"]), shard_path(paths.stage(0, "label"), 0))
    picked = {}
    for penalty in (0.0, 0.1):
        cfg = compose_cfg(["pairs=max_min", f"pairs.length_penalty={penalty}"])
        folder = paths.stage(0, "pairs")
        shutil.rmtree(folder, ignore_errors=True)
        pairs.run(cfg, paths, 0)
        (row,) = pq.read_table(shard_path(folder, 0)).to_pylist()
        picked[penalty] = (row["chosen"], row["rejected"], row["chosen_reward"])
    # no penalty: best 1.0 (long) vs worst 0.0 (mid); 0.1 per token: scores -1.0, 0.3, -0.8
    assert picked[0.0] == ("long", "mid", 1.0)
    assert picked[0.1] == ("short", "long", 0.8)


def test_the_pairs_stage_goes_shard_by_shard_and_sums_its_figures(tmp_path):
    """A generate shard holds every sample of its prompts: pairs shard k comes from
    generate and label shard k alone, and the stage's figures are over every shard (here by
    hand: best rewards 3, 5 and 1, margins 3 - 1, 5 - 2, and a tie dropped)."""
    import pyarrow as pa

    from iterate.stages import pairs
    from iterate.store.paths import Paths
    from iterate.store.shards import SCHEMAS, read_shards, shard_path, write_shard

    from .conftest import compose_cfg

    paths = Paths(run=tmp_path, base_policy="p")
    shards = {0: {"a": [1.0, 3.0], "b": [5.0, 2.0]}, 1: {"c": [1.0, 1.0]}}  # prompt: rewards
    for k, prompts in shards.items():
        rows = [(p, j, r) for p, rs in prompts.items() for j, r in enumerate(rs)]
        gen = {
            "prompt_id": [p for p, _, _ in rows],
            "sample_idx": [j for _, j, _ in rows],
            "prompt": [f"{p}?" for p, _, _ in rows],
            "response": [f"{p}{j}" for p, j, _ in rows],
            "prompt_tokens": [2] * len(rows),
            "response_tokens": [3] * len(rows),
            "finish_reason": ["stop"] * len(rows),
            "response_ids": [[1, 2, 3]] * len(rows),
        }
        lab = {
            "prompt_id": gen["prompt_id"],
            "sample_idx": gen["sample_idx"],
            "reward": [r for _, _, r in rows],
            "gold": [None] * len(rows),
            "reward_std": [None] * len(rows),
        }
        write_shard(
            pa.table(gen, schema=SCHEMAS["generate"]), shard_path(paths.stage(0, "generate"), k)
        )
        write_shard(pa.table(lab, schema=SCHEMAS["label"]), shard_path(paths.stage(0, "label"), k))
    done = pairs.run(compose_cfg(["pairs=max_min", "update=dpo"]), paths, 0)
    folder = paths.stage(0, "pairs")
    assert shard_path(folder, 0).exists() and shard_path(folder, 1).exists()
    got = read_shards(folder).to_pylist()
    assert [(r["prompt_id"], r["chosen"], r["rejected"]) for r in got] == [
        ("a", "a1", "a0"),
        ("b", "b0", "b1"),
    ]
    assert (done["prompts_in"], done["rows_out"], done["dropped"]) == (3, 2, {"tie": 1})
    assert done["reward_best_mean"] == pytest.approx((3 + 5 + 1) / 3, abs=1e-4)
    assert done["margin_mean"] == pytest.approx(((3 - 1) + (5 - 2)) / 2)
