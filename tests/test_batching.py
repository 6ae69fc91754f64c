"""How a step's examples are cut into micro-batches and how the pair rules' steps are drawn:
rows of like length together, a token budget, length-grouped steps (no model loads)."""

import pytest

from iterate.stages.update import common
from iterate.train import models
from tests.conftest import compose_cfg


def _ex(prompt: int, chosen: int, rejected: int | None = None) -> common.Example:
    return common.Example([1] * prompt, [2] * chosen, None if rejected is None else [3] * rejected)


def test_an_examples_lengths_are_its_sequences():
    """A pair feeds its prompt once and both responses (``pair_logps``); an example with
    one response feeds prompt+response whole."""
    assert _ex(5, 3, 7).lengths() == (5, 3, 7)
    assert _ex(5, 3).lengths() == (8,)


def test_padded_tokens_by_hand():
    """A pair's prompts are padded in their own batch, chosen and rejected together in one:
    the rows times the longest prompt, and twice the rows times the longest response."""
    batch = [_ex(2, 3, 10), _ex(4, 6, 1)]  # prompts 2 and 4, responses 3, 10, 6, 1
    assert models.padded_tokens(batch) == 2 * 4 + 4 * 10
    assert models.padded_tokens([_ex(2, 3), _ex(4, 6)]) == 2 * 10


def test_micro_batches_keep_like_lengths_together_and_the_given_order_inside():
    lengths = [10, 200, 12, 190, 11, 205]
    items = [_ex(0, n) for n in lengths]
    cut = models.micro_batches(items, 3)
    # longest first: (205, 200, 190), then (12, 11, 10), each in the items' own order
    assert [[len(e.chosen) for e in b] for b in cut] == [[200, 190, 205], [10, 12, 11]]
    assert models.padded_tokens(cut[0]) + models.padded_tokens(cut[1]) == 3 * 205 + 3 * 12
    # in the order given, the same two batches would pad everything to the longest
    given = [items[:3], items[3:]]
    assert sum(models.padded_tokens(b) for b in given) == 3 * 200 + 3 * 205


def test_a_step_that_fits_in_one_micro_batch_is_left_as_it_is():
    items = [_ex(0, n) for n in (5, 50, 7, 9)]
    assert models.micro_batches(items, 16) == [items]
    assert models.micro_batches(items, 16, max_tokens=4 * 50) == [items]


def test_the_token_budget_caps_every_micro_batch_padding_included():
    items = [_ex(0, n) for n in (100, 30, 30, 30, 30, 10, 10, 10, 10, 10, 10, 10, 10)]
    cut = models.micro_batches(items, 16, max_tokens=80)
    sizes = [[len(e.chosen) for e in b] for b in cut]
    # 100 alone (over the budget by itself), then 30 x 2 (a third: 90 > 80), then 10 x 8
    assert sizes == [[100], [30, 30], [30, 30], [10] * 8]
    assert all(models.padded_tokens(b) <= 80 for b in cut[1:])
    assert sorted(id(e) for b in cut for e in b) == sorted(id(e) for e in items)  # each once
    # the row cap still holds under a token budget
    assert max(len(b) for b in models.micro_batches(items, 3, max_tokens=10_000)) == 3


def test_a_pairs_budget_counts_its_prompt_and_both_responses():
    items = [_ex(5, 10, 30), _ex(5, 30, 10)]
    assert models.padded_tokens(items) == 2 * 5 + 4 * 30
    assert len(models.micro_batches(items, 4, max_tokens=129)) == 2
    assert len(models.micro_batches(items, 4, max_tokens=130)) == 1


def _steps(group: bool, n: int = 300, seed: int = 0) -> tuple[list, list[tuple[int, list]]]:
    cfg = compose_cfg(
        [
            f"seed={seed}",
            "update=dpo",
            "update.micro_batch_size=4",
            "update.grad_accum=1",
            "update.epochs=2",
            f"update.group_by_length={group}",
        ]
    )
    examples = [_ex(3, 1 + (j * 37) % 97, 1 + (j * 37) % 97 + j % 5) for j in range(n)]
    return examples, list(common.pair_steps(cfg, examples, 0))


@pytest.mark.parametrize("group", [False, True])
def test_every_epoch_takes_every_pair_once(group):
    examples, steps = _steps(group)
    for epoch in (0, 1):
        seen = [id(e) for ep, step in steps if ep == epoch for e in step]
        assert sorted(seen) == sorted(id(e) for e in examples)
    assert all(len(step) == 4 for _, step in steps)  # 300 = 75 steps of 4


def test_length_grouped_steps_pad_less_and_are_seeded():
    examples, plain = _steps(False)
    _, grouped = _steps(True)

    def padding(steps):
        real = sum(sum(e.lengths()) for _, s in steps for e in s)
        return 1 - real / sum(models.padded_tokens(s) for _, s in steps)

    assert padding(grouped) < padding(plain) / 3
    # a window's steps come in a random order: not longest first throughout
    first = [max(sum(e.lengths()) for e in s) for _, s in grouped[:50]]
    assert first != sorted(first, reverse=True)

    def lengths(steps):
        return [[e.lengths() for e in s] for _, s in steps]

    assert lengths(grouped) == lengths(_steps(True)[1]) != lengths(_steps(True, seed=1)[1])
