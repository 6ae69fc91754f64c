"""Synthetic prompts: the toy world's open grammar, the filters by hand, and self-instruct
iterations end to end on the tiny world (the prompt writer through the vLLM engine)."""

from __future__ import annotations

import json
import random

import pyarrow.parquet as pq
import pytest

from iterate import synthetic
from iterate.toy import world

from .conftest import FULL, compose_cfg


def test_the_grammar_is_wider_than_the_instruction_set():
    rng = random.Random(0)
    drawn = [world.random_instruction(f, rng) for f in world.FAMILIES for _ in range(50)]
    assert all(world.parse(i.prompt) == i for i in drawn)
    assert sum(i.prompt not in {x.prompt for x in world.INSTRUCTIONS} for i in drawn) > 50
    new = world.parse("What is 12 plus 9?")
    assert new.answer == "21" and world.gold_score(new.prompt, "Sure! 12 plus 9 is 21.") == 1.25
    assert world.parse("Count from 40 to 44.").answer == "40, 41, 42, 43, 44"
    assert world.parse("Repeat cherry 6 times.").answer == " ".join(["cherry"] * 6)
    for bad in ("What is 3 minus 9?", "Count from 9 to 3.", "Greet Bob.", "Name 7 fruits.", "Hi."):
        assert world.parse(bad) is None, bad
    with pytest.raises(ValueError, match="not a toy-world prompt"):
        world.gold_score("Greet Bob.", "Hello Bob!")


def test_near_duplicates_by_hand():
    known = synthetic.Known(["What is 3 plus 4?"])
    # 3-grams of "what is 3 plus 4": (what is 3) (is 3 plus) (3 plus 4)
    # "what is 3 plus 5": shares 2 of 4 distinct 3-grams: Jaccard 2 / 4 = 0.5
    assert known.overlap("What is 3 plus 5?") == pytest.approx(0.5)
    assert (
        known.overlap("what is 3 PLUS 4") == 1.0
        and synthetic.normalise("What is 3 plus 4?") in known.exact
    )
    assert known.overlap("Greet Anna.") == 0.0


@pytest.mark.parametrize(
    ("candidate", "reason"),
    [
        ("", "empty"),
        ("Hi", "too_short"),
        ("What is 1 plus 2?\nWhat is 2 plus 2?", "format"),
        ("I'm sorry, I cannot write that.", "format"),
        ("Write a new instruction like these: Greet Anna.", "format"),
        ("Tell me a joke about cats.", "not_in_world"),
        ("What is 3 plus 4?", "duplicate"),
        ("What is 12 plus 9?", None),
    ],
)
def test_filters(candidate, reason):
    cfg = compose_cfg(
        ["prompts=self_instruct", "prompts.synthetic.min_words=2", "prompts.synthetic.max_words=12"]
    )
    assert synthetic.check(candidate, synthetic.Known(["What is 3 plus 4?"]), cfg) == reason


def test_duplicates_are_found_after_normalising_outside_the_toy_world():
    cfg = compose_cfg(["prompts=self_instruct", "prompts.source=file", "prompts.path=p.jsonl"])
    known = synthetic.Known(["Tell me a joke about cats."])
    assert synthetic.check("tell me a JOKE about cats", known, cfg) == "duplicate"
    assert synthetic.check("Tell me a story about dogs.", known, cfg) is None


def test_near_duplicate_threshold():
    cfg = compose_cfg(["prompts=self_instruct", "prompts.synthetic.max_overlap=0.4"])
    known = synthetic.Known(["What is 3 plus 4?"])
    assert synthetic.check("What is 3 plus 5?", known, cfg) == "near_duplicate"  # 0.5 > 0.4
    cfg.prompts.synthetic.max_overlap = 0.6
    assert synthetic.check("What is 3 plus 5?", known, cfg) is None


@pytest.mark.slow
def test_self_instruct_iterations_end_to_end(full_run):
    run = full_run
    cfg = compose_cfg(FULL)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["prompts"] for r in rows] == [16, 16]
    held = set(pq.read_table(run / "heldout" / "shard_00000.parquet")["prompt"].to_pylist())
    train, _ = world.split(cfg.toy.heldout_fraction)
    pool = {i.prompt for i in train}
    made = [
        pq.read_table(run / f"iter_00{i}" / "prompts" / "shard_00000.parquet")["prompt"].to_pylist()
        for i in (0, 1)
    ]
    for i, prompts in enumerate(made):
        assert len(set(prompts)) == 16 and all(world.parse(p) for p in prompts), (
            "gradable by the gold judge"
        )
        assert not set(prompts) & (pool | held), "no seed, no held-out prompt"
        done = json.loads((run / f"iter_00{i}" / "prompts" / "_DONE.json").read_text())["synthetic"]
        assert (
            done["kept"] == 16
            and done["candidates"] == 16 + sum(done["dropped"].values()) + done["spare"]
        )
        assert "writer" in done["generator"] and done["settings"]["generator"] == "toy_writer"
    assert not set(made[0]) & set(made[1]), "an iteration never repeats an earlier one's prompts"
