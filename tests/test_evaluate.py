"""The evaluation's KL: hand-computed on built log-probs through ``losses.kl_penalty``, and on
a real policy; the win rate by hand."""

import math

import pyarrow as pa
import pytest
import torch

from iterate import models, sampling
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
    assert evaluate.win_rate([1.0, 0.5, 0.0], [0.0, 0.5, 1.0]) == pytest.approx(0.5)
    assert evaluate.win_rate([1.0, 1.0], [0.0, 0.25]) == 1.0
    with pytest.raises(ValueError):
        evaluate.win_rate([1.0], [0.0, 1.0])  # samples must be aligned


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
