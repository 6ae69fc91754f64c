"""The toy world: gold judge by hand, split stability, build determinism and caching."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from iterate.config import ToyConfig
from iterate.store import cachekey
from iterate.toy import build, world

from .conftest import ROOT, TINY, compose_cfg


@pytest.mark.parametrize(
    ("prompt", "response", "score"),
    [
        ("What is 3 plus 4?", "Sure! 3 plus 4 is 7.", 1.25),  # correct, polite, ideal length
        ("What is 3 plus 4?", "3 plus 4 is 7.", 1.0),  # correct, neutral
        ("What is 3 plus 4?", "3 plus 4 is 8.", 0.0),  # wrong
        ("What is 3 plus 4?", "Ugh, 3 plus 4 is 7. Stop asking.", 0.5),  # correct, rude
        ("What is 3 plus 4?", "7", 1.0),  # the bare answer is correct
        ("What is 3 plus 4?", "3 plus 4 is 7 or 8.", 0.0),  # hedging between answers is wrong
        ("Greet Anna.", "Hello Anna!", 1.0),
        ("Greet Anna.", "Hello Rosa!", 0.0),
        ("Greet Anna.", "Hello Anna! Hello Ben!", 0.0),  # greets someone else too
        ("Name 3 fruits.", "Sure! apple, pear, plum.", 1.25),
        ("Name 3 fruits.", "apple, pear, pear.", 0.0),  # duplicate item
        ("Name 3 fruits.", "apple, pear.", 0.0),  # too few
        ("Count from 4 to 8.", "4, 5, 6, 7, 8.", 1.0),
        ("Count from 4 to 8.", "4, 5, 7, 8.", 0.0),
        ("Repeat tea 3 times.", "tea tea tea.", 1.0),
        ("Repeat tea 3 times.", "Obviously tea tea tea tea. Boring.", -0.5),  # wrong and rude
    ],
)
def test_gold_judge_hand_cases(prompt, response, score):
    assert world.gold_score(prompt, response) == pytest.approx(score)


def test_gold_judge_penalises_length():
    short = world.gold_score("Greet Anna.", "Hello Anna!")
    long = world.gold_score("Greet Anna.", "Hello Anna! " + "That is a good question. " * 4)
    # the ideal "Happy to help! Hello Anna!" has 5 words; the long one 2 + 20 = 22: 17 over
    assert short == 1.0
    assert long == pytest.approx(1.0 - 0.02 * 17)


def test_gold_judge_rejects_unknown_prompt():
    with pytest.raises(ValueError, match="not a toy-world prompt"):
        world.gold_score("Write a poem.", "No.")


def test_best_response_is_the_gold_maximum_among_styles():
    rng = random.Random(0)
    for ins in random.Random(1).sample(world.INSTRUCTIONS, 40):
        best = world.gold_score(ins.prompt, world.best_response(ins))
        for _ in range(10):
            _, r = world.sample_response(ins, rng)
            assert world.gold_score(ins.prompt, r) <= best


def test_split_is_disjoint_stable_and_covers_every_family():
    train, held = world.split(0.2)
    assert not {i.prompt for i in train} & {i.prompt for i in held}
    assert len(train) + len(held) == len(world.INSTRUCTIONS)
    assert {i.family for i in held} == set(world.FAMILIES)
    assert world.split(0.2) == (train, held)
    assert len({i.prompt for i in world.INSTRUCTIONS}) == len(world.INSTRUCTIONS), (
        "prompts are unique"
    )


def _build_in_a_fresh_process(cfg: ToyConfig) -> Path:
    """``build.ensure(cfg)`` in a process of its own, as every run builds it. (A build late
    in a long test process was seen to differ in its weights from the session's first one,
    while builds in fresh processes match; the cause was not found.)"""
    code = (
        "import json, sys; from iterate.config import ToyConfig; from iterate.toy import "
        "build; print(build.ensure(ToyConfig(**json.loads(sys.argv[1]))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(cfg.__dict__)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(out.stdout.strip().splitlines()[-1])


def test_build_is_deterministic_and_cached(tmp_path, tiny_world, monkeypatch):
    cfg = compose_cfg(TINY).toy
    cfg.cache_dir = str(tmp_path / "again")
    again = _build_in_a_fresh_process(cfg)
    assert again == build.world_dir(cfg)
    first = json.loads((tiny_world / "world.json").read_text())
    second = json.loads((again / "world.json").read_text())
    assert first["hashes"] == second["hashes"], "same seed -> identical tokenizer and weights"
    assert cachekey.file_hash(again / "model.safetensors") == first["hashes"]["model.safetensors"]
    made = {p.name: p.stat().st_mtime_ns for p in again.iterdir()}
    monkeypatch.setattr(build, "build", lambda *a: pytest.fail("the cached world was rebuilt"))
    assert build.ensure(cfg) == again  # cached: no rebuild
    assert {p.name: p.stat().st_mtime_ns for p in again.iterdir()} == made
    other = ToyConfig(**{**cfg.__dict__, "seed": 1})
    assert build.config_hash(other) != build.config_hash(cfg)


def test_built_world_has_chat_template_and_mixed_quality(tiny_world):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_world)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Greet Anna."}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<s><|user|>\nGreet Anna.\n<|assistant|>\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    info = json.loads((tiny_world / "world.json").read_text())
    assert info["sft_steps"] > 0 and info["sft_losses"][0] > info["sft_final_loss"]
    ev = info["eval"]
    assert ev["gold_best_of_n_mean"] >= ev["gold_mean"]


def test_a_damaged_cached_world_is_built_again_and_a_dead_builds_folder_cleaned(
    tmp_path, tiny_world, caplog
):
    """A cached world whose files differ from the checksums it recorded is built again
    (every run would fail on it otherwise), and the temporary folder of a build killed
    half-way is removed by the next build."""
    import logging
    import shutil

    cfg = compose_cfg(TINY).toy
    cfg.cache_dir = str(tmp_path / "cache")
    world_dir = build.world_dir(cfg)
    shutil.copytree(tiny_world, world_dir)
    dead = world_dir.parent / f".{world_dir.name}.tmp999999"  # a build killed half-way
    dead.mkdir()
    weights = world_dir / "model.safetensors"
    truncated = weights.read_bytes()[:-64]
    weights.write_bytes(truncated)  # truncated on disk
    with caplog.at_level(logging.WARNING):
        assert build.ensure(cfg) == world_dir
    assert "model.safetensors differs from what was built" in caplog.text
    recorded = json.loads((world_dir / "world.json").read_text())["hashes"]["model.safetensors"]
    assert cachekey.file_hash(weights) == recorded, "rebuilt whole: its files as it recorded them"
    assert len(weights.read_bytes()) == len(truncated) + 64
    assert not dead.exists()
    assert cachekey._damaged(world_dir) is None


def test_the_toy_pool_draws_its_written_prompts_first_then_the_wider_grammar(tmp_path):
    """Five iterations of the demo's 120 prompts fit the toy pool: the written training
    prompts are drawn first, in the seeded order they had alone (the demo's three iterations
    draw what they drew before the pool grew), then the wider grammar's, each one scored by
    the gold judge and none held out or in the SFT data."""
    from iterate.stages import prompts
    from iterate.store.paths import Paths

    cfg = compose_cfg(["iteration=5", "prompts.per_iteration=120"])
    train, held, *_ = prompts.pools(cfg)
    written, _ = world.split(cfg.toy.heldout_fraction)
    n = len(written)
    assert {t for t in train[:n]} == {i.prompt for i in written}
    assert [t for t in train if t in {i.prompt for i in written}] == train[:n]  # first
    wider = train[n:]
    assert len(wider) == len(world.WIDER) >= 2 * 120 and not set(wider) & set(held)
    assert all(world.gold_score(t, world.best_response(world.parse(t))) == 1.25 for t in wider)
    sft = set(world.corpus(random.Random(0)))
    assert not any(t in s for t in wider[:50] for s in sft)
    prompts.check_pool(cfg, Paths(run=tmp_path, base_policy=""))  # 5 x 120 fit
    with pytest.raises(Exception, match="iterations 0..6 need 840"):
        prompts.check_pool(
            compose_cfg(["iteration=7", "prompts.per_iteration=120"]),
            Paths(run=tmp_path, base_policy=""),
        )
