"""The generative judge (``rewards.judge_model``, ``reward.kind=judge``): how its answers
parse (hand-written answers), how both orders and a tournament make its rewards (hand-computed),
what is refused at start-up, a miniature Llama-3 judge asked in its real chat template
through a vLLM engine, and a run whose judge (trained here) labels with every answer kept in
``label/judgements/``."""

from __future__ import annotations

import json
import math

import pytest

from iterate import rewards
from iterate.errors import BadInput
from iterate.rewards import judge_model as judge
from iterate.rewards import pairwise_model as pairwise
from iterate.run import validate
from iterate.sampling import samplers

from .conftest import compose_cfg

COMPARE = judge.pattern("compare", None)
SCORE = judge.pattern("score", None)


@pytest.mark.parametrize(
    "text, verdict",
    [
        ("A", 1.0),
        ("B", 0.0),
        ("C", 0.5),
        (" BB", 0.0),
        ("[[A]]", 1.0),
        ("Answer: B", 0.0),
        ("Response A is better.", 1.0),
        ("Both are fine", None),
        ("", None),
        ("abc", None),
    ],
)
def test_a_comparing_judges_answer_reads_as_the_first_verdict_it_writes(text, verdict):
    assert judge.parse(text, "compare", COMPARE, 1, 10) == verdict


@pytest.mark.parametrize(
    "text, score",
    [
        ("7", 7.0),
        ("Score: 8.5/10", 8.5),
        ("10", 10.0),
        ("11", None),
        ("0", None),
        ("seven", None),
        ("-3", None),
    ],
)
def test_a_scoring_judges_answer_is_its_first_number_within_the_range(text, score):
    assert judge.parse(text, "score", SCORE, 1, 10) == score


def test_a_pattern_of_ones_own_reads_the_verdict_where_it_says():
    mt_bench = judge.pattern("compare", r"\[\[([ABC])\]\]")
    assert judge.parse("A is long, but [[B]]", "compare", mt_bench, 1, 10) == 0.0
    assert judge.parse("A is better", "compare", mt_bench, 1, 10) is None
    with pytest.raises(BadInput, match="not a regular expression"):
        judge.pattern("score", "([0-9]")
    with pytest.raises(BadInput, match="needs a group"):
        judge.pattern("score", r"\d+")


def test_a_template_must_show_what_its_mode_needs(tmp_path):
    assert "{response}" in judge.template("score", None)
    assert judge.template("compare", None) == pairwise.template(None)
    with pytest.raises(BadInput, match=r"no \{response\}"):
        judge.template("score", "[CONTEXT] {context} Rate it.")
    f = tmp_path / "mine.txt"
    f.write_text("Q: {context}\nA: {a}\nB: {b}\nBetter?")
    assert judge.template("compare", str(f)).startswith("Q: {context}")


def test_both_orders_make_a_preference_and_the_tournament_skips_what_was_not_judged(monkeypatch):
    """Hand-computed: a comparison of rows (i, j) asked as (i, j) and (j, i). Verdicts are
    how much the response shown first won; a None order is left out; neither: NaN."""
    said = {  # (shown first, shown second) -> verdict
        # a wins both: 1
        ("a", "b"): 1.0,
        ("b", "a"): 0.0,
        # each wins when shown first: 0.5
        ("a", "c"): 1.0,
        ("c", "a"): 1.0,
        # one order judged: b wins it, 1
        ("b", "c"): None,
        ("c", "b"): 0.0,
        # nothing: NaN, left out of the tournament
        ("x", "y"): None,
        ("y", "x"): None,
    }
    j = judge.Judge("unused", None)

    def ask(prompts, shown, rows, desc=""):
        return [said[s["a"], s["b"]] for s in shown], []

    monkeypatch.setattr(j, "ask", ask)
    prefs, _ = j.prefer(["p"] * 4, ["a", "a", "b", "x"], ["b", "c", "c", "y"])
    assert prefs[:3] == [1.0, 0.5, 1.0] and math.isnan(prefs[3])
    got, _ = j.score(["p", "p", "p", "q", "q", "r"], ["a", "b", "c", "x", "y", "alone"])
    # a: wins 1 vs b and 0.5 vs c -> 0.75; b: 0 vs a, 1 vs c -> 0.5; c: 0.5, 0 -> 0.25
    assert got[:3] == pytest.approx([0.75, 0.5, 0.25])
    assert math.isnan(got[3]) and math.isnan(got[4]) and got[5] == 0.5


def test_what_a_judge_needs_is_checked_at_start_up(tmp_path):
    base = ["reward=toy_judge"]
    validate.check(compose_cfg(base))
    for extra, says in [
        (["update=ppo"], "a comparing judge compares responses"),
        (["reward.judge.mode=score"], "a scoring judge is not trained here"),
        (["reward.ensemble=2"], "must be 1 for reward.kind=judge"),
        (["reward.workers=2"], "samples on the run's engines"),
        (["reward.judge.template='[A] {a} [B] {b}'"], r"no \{context\}"),
        (["reward.judge.pattern='[AB'"], "not a regular expression"),
        (["reward.judge.max_tokens=200"], "leave reward.max_length=256 room"),
        (["reward.judge.low=5", "reward.judge.high=5"], "must be below reward.judge.high"),
    ]:
        with pytest.raises(BadInput, match=says):
            validate.check(compose_cfg([*base, *extra]))
    rm = tmp_path / "rm"
    rm.mkdir()
    (rm / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForSequenceClassification"]})
    )
    with pytest.raises(BadInput, match="a judge is a causal LM"):
        validate.check(compose_cfg([*base, "reward.train=false", f"reward.path={rm}"]))


@pytest.mark.slow
def test_a_miniature_llama3_judge_is_asked_in_its_chat_template_and_retried(tmp_path):
    """A judge of a real architecture and chat template, sampled by a vLLM engine of its
    own. Random weights write no score: each question is asked 1 + retries times, every
    answer recorded and parsed as the pattern says, the rewards NaN unless the last answer
    parsed; the same call gives the same answers (seeded)."""
    from .miniatures import model, tokenizer

    tok = tokenizer("llama3", "llama3", tmp_path / "tok")
    path = model("LlamaForCausalLM", tok, tmp_path / "judge")
    cfg = compose_cfg(
        [
            "reward.kind=judge",
            "reward.judge.mode=score",
            f"reward.path={path}",
            "reward.train=false",
            "generate=vllm",
            "reward.judge.retries=2",
            "reward.judge.max_tokens=6",
        ]
    )
    validate.check(cfg)
    reward = rewards.of(cfg, path=path)
    assert reward.identity()["judge"]["mode"] == "score" and "reward_weights" in reward.identity()
    shown = pairwise.encode(
        reward.judge().tokenizer(),
        reward.judge().text,
        [{"role": "user", "content": "Greet Anna."}],
        200,
        response="Hello Anna!",
    )
    text = tok.decode(shown)
    assert "<|start_header_id|>user<|end_header_id|>" in text and "Hello Anna!" in text
    assert text.rstrip().endswith("<|start_header_id|>assistant<|end_header_id|>")
    prompts, responses = ["Greet Anna.", "What is 2 plus 3?", "Greet Leo."], ["Hi!", "5.", "Yo"]
    got = reward.score(prompts, responses, detail=True)
    said = got.judgements
    by_row = {k: [j for j in said if j.first == k] for k in range(3)}
    for k, answers in by_row.items():
        assert [j.attempt for j in answers] == list(range(len(answers))) and answers
        assert all(j.second == -1 for j in answers)
        assert all(j.verdict == judge.parse(j.text, "score", SCORE, 1, 10) for j in answers)
        assert all(j.verdict is None for j in answers[:-1]), "parsed answers are not retried"
        last = answers[-1].verdict
        assert len(answers) == 3 or last is not None
        assert got.rewards[k] == last if last is not None else math.isnan(got.rewards[k])
    again = reward.score(prompts, responses, detail=True).judgements
    samplers.close_kept()  # the judge's engine, kept for the run
    assert [(j.first, j.attempt, j.text) for j in again] == [
        (j.first, j.attempt, j.text) for j in said
    ]


@pytest.mark.slow
def test_a_run_trains_a_judge_and_labels_keeping_every_answer(tiny_cache, tmp_path):
    """The tiny world's judge, sampled at temperature 1 (too small to be decisive when
    greedy) through the run's sampler (transformers here; vLLM in the miniature's test
    above): its answers in the label stage's judgements/ shards, read back as the
    stage's judge statistics, the unjudged rows dropped and counted, the proxy win rate
    asked of it, the inspector's line."""
    from iterate.report import show
    from iterate.run import loop
    from iterate.store.shards import SCHEMAS, read_shards

    cfg = compose_cfg(
        [
            "experiment=toy_tiny",
            "reward=toy_judge",
            "iteration=1",
            "reward.num_pairs=400",
            "reward.judge.temperature=1.0",
            "generate=transformers",
            f"runs_dir={tmp_path}",
            f"toy.cache_dir={tiny_cache}",
        ]
    )
    rows = loop.run(cfg, tmp_path / "toy_tiny")
    run = tmp_path / "toy_tiny"
    rm = json.loads((run / "reward_model" / "_DONE.json").read_text())
    assert rm["config"]["objective"] == "whole_vocab" and rm["steps"] > 0
    label = json.loads((run / "iter_000" / "label" / "_DONE.json").read_text())
    said = read_shards(run / "iter_000" / "label" / "judgements", SCHEMAS["judgement"])
    t = said.to_pandas()
    assert len(t) == label["judge"]["answers"] > label["judge"]["questions"] > 0
    assert all(
        v == judge.parse(x, "compare", COMPARE, 1, 10)
        or (v != v and judge.parse(x, "compare", COMPARE, 1, 10) is None)
        for x, v in zip(t["text"], t["verdict"])
    )
    assert t["second_idx"].ge(0).all() and t["attempt"].max() <= cfg.reward.judge.retries
    n = cfg.generate.n
    assert label["judge"]["questions"] == label["rows_in"] // n * n * (n - 1)  # both orders
    assert label["dropped"].get("unjudged", 0) == label["rows_in"] - label["rows_out"]
    labels = read_shards(run / "iter_000" / "label")
    assert labels["reward"].to_pandas().between(0, 1).all()
    assert rows[0]["judge_parsed_first_try"] == label["judge"]["parsed_first_try"]
    assert 0 <= rows[0]["proxy_win_rate"] <= 1
    assert "questions" in show.status(run) and "left unjudged" in show.status(run)
