"""Synthetic prompts: the toy world's open grammar, the filters by hand, and self-instruct
iterations end to end on the tiny world (the prompt writer through the vLLM engine)."""

from __future__ import annotations

import json
import random

import pyarrow.parquet as pq
import pytest

from iterate import synthetic
from iterate.errors import BadInput
from iterate.stages import prompts as prompt_stage
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
    in_world = lambda text: world.parse(text) is not None  # noqa: E731  (the toy source's)
    assert (
        synthetic.check(candidate, synthetic.Known(["What is 3 plus 4?"]), cfg, in_world) == reason
    )
    assert (synthetic.check(candidate, synthetic.Known(["What is 3 plus 4?"]), cfg) is None) == (
        reason in (None, "not_in_world")
    )  # without a world, a text outside the grammar passes


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
    n = cfg.prompts.per_iteration
    assert n == 32 and [r["prompts"] for r in rows] == [n, n]
    held = set(pq.read_table(run / "heldout" / "shard_00000.parquet")["prompt"].to_pylist())
    train, _ = world.split(cfg.toy.heldout_fraction)
    pool = {i.prompt for i in train}
    made = [
        pq.read_table(run / f"iter_00{i}" / "prompts" / "shard_00000.parquet")["prompt"].to_pylist()
        for i in (0, 1)
    ]
    for i, prompts in enumerate(made):
        assert len(set(prompts)) == n and all(world.parse(p) for p in prompts), (
            "gradable by the gold judge"
        )
        assert not set(prompts) & (pool | held), "no seed, no held-out prompt"
        done = json.loads((run / f"iter_00{i}" / "prompts" / "_DONE.json").read_text())["synthetic"]
        assert (
            done["kept"] == n
            and done["candidates"] == n + sum(done["dropped"].values()) + done["spare"]
        )
        assert "writer" in done["generator"] and done["settings"]["generator"] == "toy_writer"
    assert not set(made[0]) & set(made[1]), "an iteration never repeats an earlier one's prompts"


def test_the_prefix_filter_finds_every_near_duplicate_the_full_scan_finds():
    """Looking only at known prompts that share one of a candidate's rarest grams gives the
    same decision as comparing with every prompt that shares any gram, at every threshold,
    on English-like prompts whose grams are mostly shared; and the same overlap above it."""
    from iterate.bench.scale import english_prompts

    texts = english_prompts(1500, seed=3)
    known = synthetic.Known(texts[:1200])
    near = 0
    for t in (0.3, 0.5, 0.7, 0.9):
        for c in texts[1200:]:
            full, fast = known.overlap(c), known.overlap(c, t)
            assert (fast > t) == (full > t), (c, t)
            if full > t:
                assert fast == full
                near += 1
    assert near > 20  # the thresholds are met, not only missed


def _rounds(folder, *rounds):
    folder.mkdir(parents=True, exist_ok=True)
    for r, (kept, candidates) in enumerate(rounds):
        (folder / f"round_{r:05d}.json").write_text(
            json.dumps(
                {
                    "kept": kept,
                    "candidates": candidates,
                    "spare": 0,
                    "dropped": {"duplicate": candidates - len(kept)},
                    "keep_rate": round(len(kept) / candidates, 4),
                }
            )
        )


def test_prompts_kept_by_an_earlier_start_are_not_asked_for_again(tmp_path):
    """The rounds an interrupted or short start kept are replayed, not sampled again: with
    enough of them no generator is even loaded (this one does not exist)."""
    nowhere = f"prompts.synthetic.generator={tmp_path / 'no_model'}"
    cfg = compose_cfg(["prompts=self_instruct", "prompts.per_iteration=3", nowhere], tmp_path)
    _rounds(tmp_path / "passed", (["What is 1 plus 9?", "Greet Mia."], 8), (["List 2 fruits."], 8))
    known = synthetic.Known(["What is 3 plus 4?"])
    kept, info = synthetic.write(
        cfg, 0, prompt_stage.generator(cfg, ""), ["What is 3 plus 4?"], known, tmp_path / "passed"
    )
    assert kept == ["What is 1 plus 9?", "Greet Mia.", "List 2 fruits."]
    assert (info["rounds"], info["candidates"], info["dropped"]) == (2, 16, {"duplicate": 13})
    assert known.overlap("Greet Mia.") == 1.0  # what was kept is known to later candidates


def test_a_shortfall_says_whether_the_generator_ran_dry(tmp_path):
    over = [
        "prompts=self_instruct",
        "prompts.per_iteration=10",
        "prompts.synthetic.max_rounds=3",
        f"prompts.synthetic.generator={tmp_path / 'no_model'}",
    ]
    cfg = compose_cfg(over, tmp_path)
    _rounds(tmp_path / "a", (["A b c d?"] * 4, 8), (["E f g h?"] * 3, 8), (["I j k l?"] * 2, 8))
    with pytest.raises(BadInput, match=r"share kept per round: 0.500, 0.375, 0.250\); raise"):
        synthetic.write(
            cfg, 0, prompt_stage.generator(cfg, ""), ["x"], synthetic.Known(), tmp_path / "a"
        )
    _rounds(tmp_path / "b", (["A b c d?"] * 6, 8), ([], 200), ([], 200))
    with pytest.raises(BadInput, match="run out of new prompts: the share it keeps fell"):
        synthetic.write(
            cfg, 0, prompt_stage.generator(cfg, ""), ["x"], synthetic.Known(), tmp_path / "b"
        )
