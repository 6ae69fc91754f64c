"""Pair rules on one prompt's rewards: picks, ties, too few valid responses, NaN, margins."""

import math
import random

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


def test_unknown_rule():
    with pytest.raises(ValueError, match="unknown pair rule"):
        select([1.0, 0.0], "min_max", rng())
