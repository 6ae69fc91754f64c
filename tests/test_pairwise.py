"""The pairwise preference model (``rewards.pairwise_model``): its preference is the A/B token
probabilities of a real causal LM, both orders averaged (computed here by hand); the
tournament that turns preferences into rewards; its training loss; what is refused at
start-up; and a run that trains one, labels with it and asks it for the win rate."""

from __future__ import annotations

import json

import pytest
import torch

from iterate import rewards
from iterate.errors import BadInput
from iterate.rewards import pairwise_model as pairwise
from iterate.run import validate

from .conftest import compose_cfg


def _scorer(tiny_world):
    from iterate.train.models import load_policy, load_tokenizer

    model, tok = load_policy(str(tiny_world)), load_tokenizer(str(tiny_world))
    return pairwise.PairwiseScorer(model, tok, 256, batch_size=3)


def test_a_preference_is_both_orders_of_the_answer_tokens_averaged(tiny_world):
    scorer = _scorer(tiny_world)
    prompts = ["Greet Anna.", "What is 2 plus 3?"]
    a, b = ["Hello Anna!", "5."], ["Hi Leo.", "Sure! 2 plus 3 is 6."]
    got = scorer.prefer(prompts, a, b)
    tok, (ia, ib) = scorer.tokenizer, scorer.answers
    assert tok.decode([ia]) == "A" and tok.decode([ib]) == "B"
    for k in range(2):
        p_first = []
        for x, y in ((a[k], b[k]), (b[k], a[k])):
            text = scorer.text.format(context=prompts[k], a=x, b=y)
            chat = tok.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
            ids = tok(chat, add_special_tokens=False, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                last = scorer.model(input_ids=ids).logits[0, -1]
            p_first.append(torch.softmax(last[[ia, ib]], -1)[0].item())
        assert got[k] == pytest.approx(0.5 * (p_first[0] + 1 - p_first[1]), abs=1e-6)
    back = scorer.prefer(prompts, b, a)
    assert [x + y for x, y in zip(got, back)] == pytest.approx([1.0, 1.0]), "no order favoured"


def test_the_loss_is_the_answer_tokens_cross_entropy_in_both_orders(tiny_world):
    scorer = _scorer(tiny_world)
    tok = scorer.tokenizer
    msgs = [{"role": "user", "content": "Greet Anna."}]
    orders = (("Hello Anna!", "Ugh."), ("Ugh.", "Hello Anna!"))
    enc = [pairwise.encode(tok, scorer.text, msgs, 256, a=x, b=y) for x, y in orders]
    per_pair, right = pairwise.pair_loss(
        scorer.model, [tuple(enc)], tok.pad_token_id, scorer.answers
    )
    with torch.no_grad():
        la = scorer.model(input_ids=torch.tensor([enc[0]])).logits[0, -1, scorer.answers]
        lb = scorer.model(input_ids=torch.tensor([enc[1]])).logits[0, -1, scorer.answers]
    want = -la.log_softmax(-1)[0] - lb.log_softmax(-1)[1]  # "A" when chosen is first, then "B"
    assert per_pair.item() == pytest.approx(want.item(), abs=1e-5)
    prefer = 0.5 * (la.softmax(-1)[0] + lb.softmax(-1)[1])
    assert right.item() == float(prefer > 0.5)


def test_a_long_comparison_is_cut_in_its_context_and_responses_never_its_answer(tiny_world):
    scorer = _scorer(tiny_world)
    tok, text = scorer.tokenizer, scorer.text
    msgs = [{"role": "user", "content": "Greet Anna. " * 40}]
    a, b = "Hello Anna! " * 30, "Hi Anna. " * 5
    whole = pairwise.encode(tok, text, msgs, 10_000, a=a, b=b)
    tail = whole[-4:]  # the end of the user turn and the generation prompt
    for limit in (len(whole) - 50, 120):
        for x, y in ((a, b), (b, a)):
            ids = pairwise.encode(tok, text, msgs, limit, a=x, b=y)
            assert len(ids) <= limit and ids[-4:] == tail, limit
    shown = tok.decode(pairwise.encode(tok, text, msgs, len(whole) - 50, a=a, b=b))
    assert "Hi Anna. " * 5 in shown and "[RESPONSE A]" in shown, "the responses stay whole"


def test_a_tournament_gives_each_response_its_share_of_wins(monkeypatch):
    """Hand-computed: three responses to one prompt with P(0≻1)=0.9, P(0≻2)=0.6,
    P(1≻2)=0.2, and a prompt with one response (0.5: nothing to compare)."""
    table = {("a", "b"): 0.9, ("a", "c"): 0.6, ("b", "c"): 0.2}
    scorer = pairwise.PairwiseScorer.__new__(pairwise.PairwiseScorer)
    fixed = lambda p, a, b, desc="": [table[x, y] for x, y in zip(a, b)]  # noqa: E731
    monkeypatch.setattr(scorer, "prefer", fixed, raising=False)
    got = scorer.score(["p", "q", "p", "p"], ["a", "alone", "b", "c"])
    assert got == pytest.approx([(0.9 + 0.6) / 2, 0.5, (0.1 + 0.2) / 2, (0.4 + 0.8) / 2])


def test_what_a_pairwise_reward_needs_is_checked_at_start_up(tmp_path):
    cfg = compose_cfg(["reward=toy_pairwise"])
    validate.check(cfg)
    assert not rewards.refreshes(cfg), "the refresh fits Bradley-Terry models only"
    bad = [
        (["update=ppo"], "update=ppo rolls out one per prompt"),
        (["reward.ensemble=2"], "must be 1 for reward.kind=pairwise"),
        (["reward.pairwise_template='[A] {a} [B] {b}'"], "no {context}"),
    ]
    for extra, said in bad:
        with pytest.raises(BadInput, match=said):
            validate.check(compose_cfg(["reward=toy_pairwise", *extra]))
    rm = tmp_path / "rm"
    rm.mkdir()
    (rm / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForSequenceClassification"]})
    )
    with pytest.raises(BadInput, match="a pairwise model is a causal LM"):
        validate.check(
            compose_cfg(["reward=toy_pairwise", "reward.train=false", f"reward.path={rm}"])
        )
    ident = rewards.of(cfg, path=str(rm)).identity()
    assert ident["pairwise_template"] == pairwise.template(None) and "reward_weights" in ident


@pytest.mark.slow
def test_a_run_trains_a_pairwise_model_labels_by_tournament_and_asks_it(tiny_cache, tmp_path):
    from iterate.run import loop
    from iterate.store.shards import read_shards

    cfg = compose_cfg(
        [
            "experiment=toy_tiny",
            "reward=toy_pairwise",
            "generate=transformers",
            "iteration=1",
            "reward.num_pairs=100",
            f"runs_dir={tmp_path}",
            f"toy.cache_dir={tiny_cache}",
        ]
    )
    rows = loop.run(cfg, tmp_path / "toy_tiny")
    run = tmp_path / "toy_tiny"
    rm = json.loads((run / "reward_model" / "_DONE.json").read_text())
    assert rm["steps"] > 0 and 0 <= rm["heldout_accuracy"] <= 1
    assert rm["config"]["pairwise_template"] == pairwise.template(None)
    assert (run / "reward_model" / "model" / "config.json").exists()
    labels = read_shards(run / "iter_000" / "label").to_pandas()
    by_prompt = labels.groupby("prompt_id")["reward"].agg(["mean", "min", "max"])
    assert by_prompt["mean"].round(6).eq(0.5).all(), "shares of wins average one half"
    assert (by_prompt["max"] > by_prompt["min"]).any() and labels["reward"].between(0, 1).all()
    assert not (run / "iter_000" / "reward").exists()
    assert 0 <= rows[0]["proxy_win_rate"] <= 1 and rows[0]["win_rate_vs_initial"] is not None
