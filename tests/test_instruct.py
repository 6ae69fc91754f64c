"""The instruction-following world: every checker on hand-written responses that keep and
break it, the reward functions over prompt rows, and the committed prompt files (what the
generator makes, held-out topics disjoint from the training ones)."""

from __future__ import annotations

import json
import random

import pytest

from iterate.instruct import checks, prompts
from iterate.instruct.checks import KINDS

from .conftest import ROOT, compose_cfg

# kind -> (args, responses that keep it, responses that break it)
CASES = {
    "max_words": (
        {"n": 5},
        ["One two three four.", "Hi."],
        ["One two three four five.", "a b c d e f"],
    ),
    "min_words": ({"n": 3}, ["one two three", "It's a fine day."], ["one two", ""]),
    "max_sentences": (
        {"n": 2},
        ["One. Two!", "Just one without a mark"],
        ["One. Two. Three.", "A? B! C.", ""],
    ),
    "bullets": (
        {"n": 2},
        ["Intro:\n* first\n* second", "- a\n- b"],
        ["* only one", "* a\n* b\n* c", "no bullets at all"],
    ),
    "lowercase": ({}, ["all small here, fine.", "x = 3"], ["One capital", "123"]),
    "capitals": ({}, ["ALL LOUD!", "OK 42"], ["Not all loud", "!!!"]),
    "no_commas": ({}, ["No commas here.", ""], ["One, two."]),
    "keywords": (
        {"a": "light", "b": "home"},
        ["The Light at home.", "home, light"],
        ["light only", "lighthouse at home"],
    ),
    "forbidden": ({"w": "the"}, ["A cat sat.", "Theatre is fine."], ["The cat.", "on the mat"]),
    "starts_with": (
        {"phrase": "Dear reader,"},
        ["Dear reader, hello.", "  dear READER, hi"],
        ["Hello. Dear reader,", ""],
    ),
    "ends_with": (
        {"phrase": "That is all."},
        ["Done. That is all.", "that is all.  \n"],
        ["That is all. More.", "That is all"],
    ),
    "json": (
        {},
        ['{"a": 1}', '```json\n{"poem": "x"}\n```', "[1, 2]"],
        ["{a: 1}", 'Here is JSON: {"a": 1}', ""],
    ),
    "title": (
        {},
        ["<<Ode to Tea>>\nWarm cup.", "x <<t>> y"],
        ["<<>> empty", "<no title>", "Title"],
    ),
    "paragraphs": (
        {"n": 2},
        ["First.\n***\nSecond.", "a\n\n***\n\nb\n"],
        ["One paragraph.", "a\n***\nb\n***\nc"],
    ),
    "quotation": ({}, ['"All quoted."', '  "x"  '], ['"Open only', "none", '"']),
    "placeholders": (
        {"n": 2},
        ["Go to [address] at [time].", "[a] [b] [c]"],
        ["Only [one].", "[] nothing"],
    ),
    "postscript": ({}, ["Hi.\nP.S. bye", "Hi.\n\n  P. S. later"], ["No postscript.", "PS bye"]),
    "highlights": (
        {"n": 2},
        ["*one* and *two*", "A *b c* then *d*."],
        ["*one* only", "**bold** is not *", "no marks"],
    ),
}


def test_every_kind_has_hand_written_cases():
    assert set(CASES) == set(KINDS) and len(KINDS) >= 12


@pytest.mark.parametrize("kind", sorted(CASES))
def test_a_checker_keeps_and_breaks_what_it_should(kind):
    args, good, bad = CASES[kind]
    c = {"kind": kind, "args": args}
    for r in good:
        assert checks.holds(c, r), (kind, r)
    for r in bad:
        assert not checks.holds(c, r), (kind, r)
    assert checks.instruction(c) and "{" not in checks.instruction(c)


def test_the_rewards_read_each_rows_constraints():
    """The share kept (instruction level) and all-or-nothing (prompt level); a row's
    constraints as stored (a JSON string, or a table's rows whose args carry every kind's
    names, the others None); a row without constraints scores None."""
    both = [{"kind": "lowercase", "args": {"n": None}}, {"kind": "max_words", "args": {"n": 4}}]
    rows = [json.dumps(both), both, None, []]
    responses = ["all small", "Too Many Words Here Now", "x", "y"]
    assert checks.reward([""] * 4, responses, rows) == [1.0, 0.0, None, None]
    assert checks.prompt_level([""] * 4, responses, rows) == [1.0, 0.0, None, None]
    assert checks.reward([""], ["Short but Capital"], [both]) == [0.5]
    assert checks.prompt_level([""], ["Short but Capital"], [both]) == [0.0]
    assert checks.instruction_level is checks.reward


def test_drawn_constraints_never_share_a_group():
    rng = random.Random(0)
    for _ in range(500):
        cs = prompts.draw_constraints(rng)
        groups = [g for c in cs for g in (c["kind"], *KINDS[c["kind"]].groups)]
        assert len(groups) == len(set(groups)), cs


def test_the_committed_prompt_files_are_what_the_generator_makes(tmp_path):
    """data/instruct/ is what ``python -m iterate.instruct.prompts`` writes; the held-out
    prompts' topics are none of the training (or reward-model) prompts'; no prompt is in two
    files; every prompt asks, in its text, for each of its constraints."""
    made = prompts.write(tmp_path)
    for name, path in made.items():
        assert (ROOT / "data/instruct" / path.name).read_text() == path.read_text(), name
    rows = {n: [json.loads(x) for x in p.read_text().splitlines()] for n, p in made.items()}
    seen = {r["topic"] for name in ("train", "rm") for r in rows[name]}
    assert not seen & {r["topic"] for r in rows["heldout"]}
    every = [r["prompt"] for name in prompts.FILES for r in rows[name]]
    assert len(every) == len(set(every)), "no prompt in two files"
    for name, (_, count) in prompts.FILES.items():
        texts = [r["prompt"] for r in rows[name]]
        assert len(texts) == count == len(set(texts))
    for r in rows["heldout"] + rows["train"][:200]:
        assert all(checks.instruction(c) in r["prompt"] for c in r["constraints"])


@pytest.mark.parametrize(
    ("overrides", "run", "settings"),
    [
        ([], "instruct_dpo", {"lr": 5e-4, "epochs": 2}),
        (["update=raft"], "instruct_raft", {"lr": 2e-4}),
        (["update=grpo"], "instruct_grpo", {"group_size": 8, "drop_equal_groups": True}),
        (["reward=instruct_rm"], "instruct_rm_dpo", {"lr": 5e-4}),
    ],
)
def test_the_presets_compose_each_into_a_run_of_its_own(overrides, run, settings):
    """experiment=instruct with each rule (its tuning for model=smollm2 applied) and with
    the learned reward: one run folder each, the checkers as evaluation judges, and the
    learned reward trained from the checkers' labels of the initial policy's samples."""
    cfg = compose_cfg(["experiment=instruct", *overrides])
    assert cfg.run_name == run and cfg.model.path == ".cache/models/smollm2"
    assert {k: getattr(cfg.update, k) for k in settings} == settings
    assert [j.name for j in cfg.evaluate.judges] == ["prompt_level", "instruction_level"]
    assert cfg.prompts.fields == ["constraints"] and cfg.generate.n == 8
    if "reward=instruct_rm" in overrides:
        rc = cfg.reward
        assert (rc.kind, rc.train, rc.source) == ("model", True, "policy")
        assert rc.label_function == "iterate.instruct.checks:reward"
    else:
        assert cfg.reward.function == "iterate.instruct.checks:reward"


def test_a_run_without_gold_plots_its_main_judge_in_gold_s_place(tmp_path, monkeypatch):
    """A real model's run has no gold judge: the plot's win-rate and held-out panels show
    the main judge's figures, named, instead of staying empty."""
    from iterate.report import metrics

    def row(i, rate, mean):
        return {
            "iteration": i,
            "win_rate": rate,
            "reference": "initial",
            "main_judge": "prompt_level",
            "judge_means": {"prompt_level": {"mean": mean}},
            "reward_mean": 0.3,
            "kl_to_reference": 1.0 + i,
            "response_tokens_mean": 80,
            "accepted": True,
        }

    drawn: dict[str, list] = {}
    monkeypatch.setattr(metrics, "panel", lambda ax, title: drawn.setdefault(title, ax.lines))
    metrics.plot([row(0, 0.52, 0.26), row(1, 0.55, 0.32)], tmp_path / "m.png", max_kl=10)
    assert (tmp_path / "m.png").stat().st_size > 0
    rates = drawn["win rate vs initial: prompt_level, proxy --, LC :"]
    assert list(rates[0].get_ydata()) == [0.52, 0.55]
    assert list(drawn["prompt_level score (held-out)"][0].get_ydata()) == [0.26, 0.32]
