"""The evaluation's KL: hand-computed on built log-probs through ``losses.kl_penalty``, and on
a real policy; the win rate by hand."""

import math

import pyarrow as pa
import pytest
import torch

from iterate import models, sampling, winrate
from iterate.shards import SCHEMAS
from iterate.stages import evaluate
from iterate.stages.update import common


def test_sequence_kl_by_hand():
    new = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, 0.0], [-0.5, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    kl = evaluate.sequence_kl(new, ref, mask)
    # k1 = log p - log q per token: 0.5 - 1.0; k3 = e^r - 1 - r with r = log q - log p
    assert kl["k1"] == pytest.approx([-0.5, 0.0])
    k3_row0 = (math.exp(-0.5) - 1 + 0.5) + (math.exp(1.0) - 1 - 1.0)
    assert kl["k3"] == pytest.approx([k3_row0, 0.0])
    # tokens outside the mask do not count, whatever their values
    noisy = new.clone()
    noisy[0, 2] = -9.0
    assert evaluate.sequence_kl(noisy, ref, mask) == kl


def test_win_rate_by_hand():
    assert winrate.judged([1.0, 0.5, 0.0], [0.0, 0.5, 1.0]) == [1.0, 0.5, 0.0]
    assert winrate.figures([1.0, 0.5, 0.0], [3, 3, 3], [3, 3, 3])["win_rate"] == 0.5
    with pytest.raises(ValueError):
        winrate.judged([1.0], [0.0, 1.0])  # samples must be aligned


def test_the_main_figures_are_the_gold_judges_where_there_is_one():
    gold = winrate.figures([1.0, 1.0, 0.0, 0.5], [30, 40, 10, 20], [20, 20, 20, 20])
    reward = winrate.figures([0.0, 1.0], [30, 10], [20, 20])
    got = evaluate.main_figures({"reward": reward, "gold": gold})
    assert got["main_judge"] == "gold" and got["length_ratio"] == 1.25
    assert got["lc_win_rate"] == gold["lc_win_rate"] and got["win_ties"] == 0.25
    assert evaluate.main_figures({"reward": reward})["length_ratio"] == 1.0
    assert evaluate.main_figures({"reward": {}}) == {}


def _samples(tok, policy_model, n=2):
    prompts = ["Greet Anna.", "What is 2 plus 3?", "Count from 1 to 4."]
    sampler = sampling.make("transformers", sampling.Spec())
    sampler.sync(policy_model, tok, "")
    planned = [(f"p{i}", p, models.prompt_ids(tok, p)) for i, p in enumerate(prompts)]
    samples = sampler.sample(
        [ids for *_, ids in planned], sampling.Params(n=n, max_tokens=10), seed=0
    )
    return pa.Table.from_pylist(sampling.shard_rows(planned, samples), schema=SCHEMAS["generate"])


def test_kl_of_a_real_policy(tiny_cfg, tiny_world, tmp_path):
    """A fresh LoRA adapter (B = 0) is the reference itself: KL exactly 0 with the adapter
    disabled. Against another reference model, k3 > 0 and k1's mean is the KL estimate."""
    tiny_cfg.update.lora.dropout = 0.0
    tok = models.load_tokenizer(str(tiny_world))
    model = common.policy_model(tiny_cfg, str(tiny_world), torch.device("cpu")).eval()
    samples = _samples(tok, model)
    same = evaluate.kl(tiny_cfg, tok, model, str(tiny_world), str(tiny_world), samples)
    assert same["k1"] == [0.0] * samples.num_rows and same["k3"] == [0.0] * samples.num_rows
    other = tmp_path / "other"
    ref = models.load_policy(str(tiny_world))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ref.save_pretrained(other)
    tok.save_pretrained(other)
    apart = evaluate.kl(tiny_cfg, tok, model, str(other), str(tiny_world), samples)
    assert all(k > 0 for k in apart["k3"]) and len(apart["k1"]) == samples.num_rows
    # the same numbers by hand from the two models' log-probs
    prompts = [models.prompt_ids(tok, p) for p in samples["prompt"].to_pylist()]
    new, mask = evaluate.logps_of(
        model, tok, prompts, samples["response_ids"].to_pylist(), 4, torch.device("cpu")
    )
    theirs, _ = evaluate.logps_of(
        ref, tok, prompts, samples["response_ids"].to_pylist(), 4, torch.device("cpu")
    )
    assert apart["k1"] == pytest.approx(((new - theirs) * mask).sum(-1).tolist(), abs=1e-5)


def test_the_length_gates_reject_beside_the_kl_budget_naming_each_failure():
    from iterate import validate
    from iterate.errors import BadInput
    from iterate.stages import handoff

    from .conftest import compose_cfg

    ev = {"kl": {"k1": 2.0, "k3": 1.9}, "length_ratio": 1.6, "lc_win_rate": 0.48}
    plain = compose_cfg([])
    assert handoff.gate(plain, ev)["accepted"]  # no length gate asked: the KL alone
    cfg = compose_cfg(["handoff.max_length_ratio=1.5", "handoff.min_lc_win_rate=0.5"])
    got = handoff.gate(cfg, ev)
    assert not got["accepted"] and got["failed"] == [
        "length ratio 1.6 > 1.5", "LC win rate 0.48 < 0.5"
    ]  # fmt: skip
    assert got["decision"].startswith("reject (stop): length ratio")
    ok = handoff.gate(cfg, {**ev, "length_ratio": 1.2, "lc_win_rate": 0.55})
    assert ok["accepted"] and ok["decision"] == "accept" and ok["length_ratio"] == 1.2
    unfitted = handoff.gate(cfg, {**ev, "length_ratio": 1.2, "lc_win_rate": None})
    assert unfitted["failed"] == ["LC win rate none (not fitted) < 0.5"]
    both = handoff.gate(cfg, {**ev, "kl": {"k1": 12.0, "k3": 11.0}})
    assert both["failed"][0] == "KL 12 > 10" and len(both["failed"]) == 3
    for bad in ("handoff.max_length_ratio=0", "handoff.min_lc_win_rate=1.5"):
        with pytest.raises(BadInput, match=bad.split("=")[0]):
            validate.check(compose_cfg([bad]))
