"""Reward functions ready to use as a source (``reward.function`` or a mixture's
``function``): ``iterate.reward_functions:words``. Each is ``f(prompts, responses)`` with
one number per response."""

from __future__ import annotations


def words(prompts: list, responses: list[str]) -> list[float]:
    """The response's length in words: with a negative weight in a mixture, a length
    penalty; with a positive one, the reward that iterative DPO is known to hack."""
    return [float(len(r.split())) for r in responses]


def characters(prompts: list, responses: list[str]) -> list[float]:
    """The response's length in characters (AlpacaEval's length measure)."""
    return [float(len(r)) for r in responses]
