"""PPO and ReMax on the tiny policy: which parameters get gradients, and a tiny end-to-end
iteration of each."""

import dataclasses
import json

import pytest
import torch

from iterate import loop, losses, models, reward_model
from iterate.update import common, ppo, remax, rl

from .conftest import compose_cfg

PROMPTS = ["Greet Anna.", "What is 2 plus 3?", "Count from 1 to 4.", "Name 2 fruits."]


def _setup(tiny_cfg, tiny_world, **update):
    cfg = tiny_cfg
    for k, v in update.items():
        setattr(cfg.update, k, v)
    dev = torch.device("cpu")
    tok = models.load_tokenizer(str(tiny_world))
    model = common.policy_model(cfg, str(tiny_world), dev)
    rm, rm_tok = reward_model.load_model(str(tiny_world))
    prompts = [(p, models.prompt_ids(tok, p)) for p in PROMPTS]
    return cfg, dev, tok, model, rm, rm_tok, prompts


def _grads(named):
    return {n for n, p in named if p.grad is not None and p.grad.abs().sum() > 0}


@pytest.mark.parametrize("value_head", ["policy", "reference_bottom"])
def test_ppo_gradients_reach_only_lora_and_the_value_head(tiny_cfg, tiny_world, value_head):
    cfg, dev, tok, model, rm, rm_tok, prompts = _setup(tiny_cfg, tiny_world, name="ppo", value_head=value_head, value_layers=1)
    torch.manual_seed(0)
    head = ppo.new_head(cfg)(model)
    state = {"kl_coef": 0.05}
    batch = ppo.make_batch(cfg)(model, tok, rm, rm_tok, prompts, dev, None, head, state)
    assert batch.rollout.resp.sum() > 0 and batch.advantages.shape == batch.rollout.resp.shape
    with torch.no_grad():  # make the adapter non-zero so every LoRA matrix sees a gradient
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    per_example, metrics = ppo.step_loss(cfg, model, None, batch, head, state)
    per_example.mean().backward()
    touched = _grads(model.named_parameters())
    assert touched and all("lora_" in n for n in touched), sorted(touched)
    assert all(p.grad is not None for p in head.parameters()), "the value head learns"
    assert {"reward", "kl", "policy_loss", "value_loss"} <= metrics.keys()


def test_remax_gradients_reach_only_lora(tiny_cfg, tiny_world):
    cfg, dev, tok, model, rm, rm_tok, prompts = _setup(tiny_cfg, tiny_world, name="remax")
    torch.manual_seed(0)
    sample, greedy = remax.make_batch(cfg)(model, tok, rm, rm_tok, prompts, dev, None, None, {})
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    per_example, metrics = remax.step_loss(cfg, model, None, (sample, greedy))
    per_example.mean().backward()
    touched = _grads(model.named_parameters())
    assert touched and all("lora_" in n for n in touched)
    # the greedy baseline is deterministic: a second greedy rollout gives the same texts
    again = rl.rollout(cfg, model, tok, rm, rm_tok, prompts, True, dev)
    assert again.texts == greedy.texts
    assert metrics["advantage"] == pytest.approx((sample.scores.clamp(-1e1, 1e1) - greedy.scores.clamp(-1e1, 1e1)).mean().item(), abs=1e-5)
    # without the KL term the loss is -sum(A * logp) over all the batch's response tokens
    # divided by their number: every token weighs the same, whatever its sequence's length
    cfg.update.kl_coef = 0.0
    model.eval()
    resp = sample.resp.clone()
    first = int(resp[0].nonzero()[0])
    resp[0, first + 2 :] = 0  # make the first response 2 tokens long, the others longer
    sample = dataclasses.replace(sample, resp=resp)
    with torch.no_grad():
        per_example, _ = remax.step_loss(cfg, model, None, (sample, greedy))
        lp = rl.logps(model, sample)
    adv = losses.remax_advantage(sample.scores, greedy.scores, cfg.update.reward_clip)
    assert sample.resp.sum(-1).unique().numel() > 1
    expected = -(adv[:, None] * lp * sample.resp).sum() / sample.resp.sum()
    assert per_example.mean().item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["ppo", "remax"])
def test_on_policy_rule_end_to_end(rule, tiny_cache, tiny_world, tmp_path):
    cfg = compose_cfg(["experiment=toy_tiny", f"update={rule}", "generate=transformers", "iteration=1",
                       f"runs_dir={tmp_path}", f"toy.cache_dir={tiny_cache}", "reward.num_pairs=100"])  # fmt: skip
    rows = loop.run(cfg, tmp_path / "toy_tiny")
    upd = json.loads((tmp_path / "toy_tiny" / "iter_000" / "update" / "_DONE.json").read_text())
    assert upd["rule"] == rule and upd["steps"] > 0 and upd["skipped_steps"] == 0
    assert (tmp_path / "toy_tiny" / "iter_000" / "update" / "adapter").exists()
    assert (tmp_path / "toy_tiny" / "iter_000" / "update" / "value_head.pt").exists() == (rule == "ppo")
    assert upd["peak_rss_mb"] > 0
    assert rows[0]["update"] == rule and rows[0]["kl_to_reference"] is not None
