"""PPO, ReMax and the group rules on the tiny policy: which parameters get gradients, the
value head on the configured reference, hand-checked advantages and loss aggregation, and
tiny end-to-end iterations (one with vLLM and transformers' ``generate`` forbidden)."""

import json
import math

import pytest
import torch

from iterate.report import runinfo, show
from iterate.rewards import scorer as scoring
from iterate.rewards.scorer import Scorer
from iterate.run import loop
from iterate.sampling import samplers
from iterate.stages.update import common, group, ppo, remax, rl
from iterate.store.shards import read_shards
from iterate.train import losses, models

from .conftest import compose_cfg

PROMPTS = ["Greet Anna.", "What is 2 plus 3?", "Count from 1 to 4.", "Name 2 fruits."]


def _ctx(tiny_cfg, tiny_world, ref_model=None, **update) -> rl.Context:
    cfg = tiny_cfg
    for k, v in update.items():
        setattr(cfg.update, k, v)
    dev = torch.device("cpu")
    tok = models.load_tokenizer(str(tiny_world))
    model = common.policy_model(cfg, str(tiny_world), dev)
    sampler = samplers.make("transformers", samplers.Spec(max_length=cfg.model.max_length))
    sampler.sync(model, tok, str(tiny_world))
    rm, rm_tok = scoring.load_model(str(tiny_world), new_head=True)
    scorer = Scorer(rm, rm_tok, 128, 8)  # an untrained head, asked for: any real scores do
    head = ppo.new_head(cfg, model) if cfg.update.name == "ppo" else None
    return rl.Context(cfg, model, tok, dev, ref_model, sampler, scorer, head, {"kl_coef": 0.05})


def _prompts(ctx):
    return [(p, models.prompt_ids(ctx.tok, p)) for p in PROMPTS]


def _grads(named):
    return {n for n, p in named if p.grad is not None and p.grad.abs().sum() > 0}


def _nonzero_adapter(model):
    with torch.no_grad():  # make the adapter non-zero so every LoRA matrix sees a gradient
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)


@pytest.mark.parametrize("value_head", ["policy", "reference_bottom"])
def test_ppo_gradients_reach_only_lora_and_the_value_head(tiny_cfg, tiny_world, value_head):
    ctx = _ctx(tiny_cfg, tiny_world, name="ppo", value_head=value_head, value_layers=1)
    torch.manual_seed(0)
    examples = ppo.prepare(ctx, _prompts(ctx), seed=0)
    assert len(examples) == len(PROMPTS)
    for e in examples:  # per-token tensors, one value per response token
        assert all(
            e.rollout[k].shape == (len(e.chosen),)
            for k in ("old_logps", "old_values", "advantages", "returns")
        )
    adv = torch.cat([e.rollout["advantages"] for e in examples])
    assert abs(adv.mean().item()) < 1e-5 and adv.std(unbiased=False).item() == pytest.approx(
        1.0, abs=1e-3
    ), "whitened"
    _nonzero_adapter(ctx.model)
    ctx.model.train()
    per_example, metrics = ppo.loss(ctx, ctx.model, examples)
    per_example.mean().backward()
    touched = _grads(ctx.model.named_parameters())
    assert touched and all("lora_" in n for n in touched), sorted(touched)
    assert all(p.grad is not None for p in ctx.head.parameters()), "the value head learns"
    assert {"reward", "kl", "policy_loss", "value_loss"} <= metrics.keys()


def test_reference_bottom_value_head_uses_the_configured_reference(tiny_cfg, tiny_world):
    """With a reference other than the policy (handoff.reference=previous, or LoRA off), the
    value head reads that reference's hidden states, not the adapter-disabled policy's."""
    other = models.load_policy(str(tiny_world))
    torch.manual_seed(5)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ctx = _ctx(tiny_cfg, tiny_world, name="ppo", value_head="reference_bottom", value_layers=1)
    examples = ctx.rollout(_prompts(ctx), seed=0)
    ids, mask, resp = ctx.batch(examples)
    with torch.no_grad():
        _, own = ppo.forward(ctx, ctx.model, ids, mask, resp)
        ctx.ref_model = other
        _, theirs = ppo.forward(ctx, ctx.model, ids, mask, resp)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        hidden = other(
            input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True
        ).hidden_states[1]
        expected = ctx.head(hidden[:, :-1].float()).squeeze(-1) * resp
    assert torch.allclose(theirs, expected, atol=1e-5)
    assert not torch.allclose(own, theirs, atol=1e-3)
    # full fine-tuning (no adapter to disable): the reference is its own frozen model
    tiny_cfg.update.lora.enabled = False
    full = _ctx(
        tiny_cfg,
        tiny_world,
        ref_model=other,
        name="ppo",
        value_head="reference_bottom",
        value_layers=1,
    )
    examples = ppo.prepare(full, _prompts(full), seed=0)
    assert all(torch.isfinite(e.rollout["old_values"]).all() for e in examples)


def test_remax_gradients_reach_only_lora_and_its_loss_weighs_every_token_alike(
    tiny_cfg, tiny_world
):
    ctx = _ctx(tiny_cfg, tiny_world, name="remax")
    examples = remax.prepare(ctx, _prompts(ctx), seed=0)
    _nonzero_adapter(ctx.model)
    ctx.model.train()
    per_example, metrics = remax.loss(ctx, ctx.model, examples)
    per_example.mean().backward()
    touched = _grads(ctx.model.named_parameters())
    assert touched and all("lora_" in n for n in touched)
    # the greedy baseline is deterministic: a second greedy rollout gives the same responses
    greedy = [e.chosen for e in ctx.rollout(_prompts(ctx), seed=99, greedy=True)]
    assert greedy == [e.chosen for e in ctx.rollout(_prompts(ctx), seed=1, greedy=True)]
    adv = [e.rollout["score"] - e.rollout["greedy_score"] for e in examples]
    assert metrics["advantage"] == pytest.approx(sum(adv) / len(adv), abs=1e-5)
    # without the KL term the loss is -sum(A * logp) over all the batch's response tokens
    # divided by their number: every token weighs the same, whatever its sequence's length
    ctx.cfg.update.kl_coef = 0.0
    ctx.model.eval()
    examples[0].chosen = examples[0].chosen[:2]
    examples[0].rollout["ref_logps"] = examples[0].rollout["ref_logps"][:2]
    examples[0].rollout["sampler_logps"] = examples[0].rollout["sampler_logps"][:2]
    with torch.no_grad():
        per_example, _ = remax.loss(ctx, ctx.model, examples)
        ids, mask, resp = ctx.batch(examples)
        lp = models.token_logps(ctx.model, ids, mask) * resp
    a = torch.tensor([e.rollout["advantage"] for e in examples])
    assert resp.sum(-1).unique().numel() > 1
    expected = -(a[:, None] * lp * resp).sum() / resp.sum()
    assert per_example.mean().item() == pytest.approx(expected.item(), rel=1e-5)
    assert losses.remax_advantage(torch.tensor([2.0]), torch.tensor([-3.0]), 1.0).item() == 2.0


@pytest.mark.parametrize("rule", ["grpo", "rloo", "reinforce_pp"])
def test_group_rules_advantages_and_loss_by_hand(tiny_cfg, tiny_world, rule):
    """A group per prompt, consecutive; advantages from the group's rewards (GRPO: centred
    and scaled by the group's std; RLOO without a KL: less the others' mean; REINFORCE++:
    whitened over the batch's tokens); with one pass the ratio is 1 and the loss is
    -A averaged over the batch's tokens; gradients reach only LoRA."""
    ctx = _ctx(tiny_cfg, tiny_world, name=rule, group_size=3, kl_coef=0.0, reward_clip=100.0)
    examples = group.prepare(ctx, _prompts(ctx), seed=0)
    assert len(examples) == 3 * len(PROMPTS)
    assert [e.prompt for e in examples] == [ids for _, ids in _prompts(ctx) for _ in range(3)]
    scores = torch.tensor([e.rollout["score"] for e in examples], dtype=torch.float64).view(-1, 3)
    adv = [float(e.rollout["advantages"][0]) for e in examples]
    if rule == "grpo":
        want = (scores - scores.mean(-1, keepdim=True)) / (scores.std(-1, keepdim=True) + 1e-4)
        assert adv == pytest.approx(want.flatten().tolist(), abs=1e-5)
    elif rule == "rloo":
        want = scores - (scores.sum(-1, keepdim=True) - scores) / 2
        assert adv == pytest.approx(want.flatten().tolist(), abs=1e-5)
    else:  # every token's advantage: its return (the score, no KL), whitened over all tokens
        flat = torch.cat([e.rollout["advantages"] for e in examples])
        assert flat.mean().item() == pytest.approx(0, abs=1e-5)
        assert flat.std(unbiased=False).item() == pytest.approx(1, abs=1e-3)
        assert all(len(e.rollout["advantages"]) == len(e.chosen) for e in examples)
    _nonzero_adapter(ctx.model)
    ctx.model.train()
    per_example, metrics = group.loss(ctx, ctx.model, examples)
    per_example.mean().backward()
    touched = _grads(ctx.model.named_parameters())
    assert touched and all("lora_" in n for n in touched) and metrics["clip_frac"] == 0
    ids, mask, resp = ctx.batch(examples)
    a = rl.grid([e.rollout["advantages"] for e in examples], resp)
    expected = -(a * resp).sum() / resp.sum()
    assert per_example.mean().item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("rule", ["grpo", "ppo"])
def test_a_steps_token_mean_is_the_same_however_it_is_micro_batched(tiny_cfg, tiny_world, rule):
    """The rollout loop records the step's mean response length on its examples; with it, the
    step's loss and gradients under loss_agg=token_mean are the same in micro-batches of 1
    as in one batch (each micro-batch's own token mean would weigh a short one's tokens
    more)."""
    from iterate.stages.update import training

    ctx = _ctx(tiny_cfg, tiny_world, name=rule, group_size=3, micro_batch_size=len(PROMPTS))
    fns = {"grpo": group, "ppo": ppo}[rule]
    _, examples = next(rl.rollout_steps(ctx, _prompts(ctx), 0, fns.prepare, 1, "policy", {}))
    lengths = {len(e.chosen) for e in examples}
    assert len(lengths) > 1, "responses of different lengths, or the test shows nothing"
    tokens = sum(len(e.chosen) for e in examples)
    assert examples[0].rollout["step_mean_tokens"] == pytest.approx(tokens / len(examples))
    _nonzero_adapter(ctx.model)
    ctx.model.eval()  # no dropout: the same forward either way
    seen = []
    for size in (len(examples), 1):
        ctx.model.zero_grad()
        loss, _ = training.accumulate(ctx.model, examples, lambda m, b: fns.loss(ctx, m, b), size)
        grads = [p.grad.clone() for p in ctx.model.parameters() if p.grad is not None]
        seen.append((loss, grads))
    (whole, g_whole), (ones, g_ones) = seen
    assert ones == pytest.approx(whole, rel=1e-5, abs=1e-7)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(g_whole, g_ones))


def greetings_tie(prompts, responses):
    """A reward under which every group of a greeting ties (0) and no other group does."""
    return [
        0.0 if p.startswith("Greet") else len(r) + 0.1 * i
        for i, (p, r) in enumerate(zip(prompts, responses))
    ]


def test_equal_groups_are_dropped_counted_and_refilled_from_other_prompts(tiny_cfg, tiny_world):
    """Under a reward where the greetings' groups tie: kept with an advantage of 0 by
    default; left out with drop_equal_groups, the step two groups short; with refill_rounds,
    further rollouts of prompts drawn from the iteration's fill it again: drawn without
    replacement and never one the step already rolled out (a prompt twice in a step would be
    one 2n-way tournament to a pairwise reward), so every prompt of the step is there once;
    with no fresh prompt left to draw, the step stays short."""
    from iterate.rewards import FunctionReward

    ctx = _ctx(tiny_cfg, tiny_world, name="grpo", group_size=3)
    ctx.reward = FunctionReward("tests.test_rl:greetings_tie")
    texts = ["Greet Anna.", "Greet Tom.", "What is 2 plus 3?", "Count from 1 to 4."]
    prompts = [(p, models.prompt_ids(ctx.tok, p)) for p in texts]
    others = [(p, models.prompt_ids(ctx.tok, p)) for p in ("Name 2 fruits.", "Name 3 colours.")]
    kept = group.prepare(ctx, prompts, seed=0)
    assert len(kept) == 12 and kept[0].rollout["equal_groups"] == 2
    assert all(float(e.rollout["advantages"].abs().max()) == 0 for e in kept[:6])
    ctx.cfg.update.drop_equal_groups = True
    kept = group.prepare(ctx, prompts, seed=0)
    assert len(kept) == 6 and kept[0].rollout["short_groups"] == 2
    assert [e.prompt for e in kept] == [ids for _, ids in prompts[2:] for _ in range(3)]
    ctx.cfg.update.refill_rounds = 2
    ctx.pool = prompts + others  # the step's own prompts are in the pool: never drawn again
    ctx.counts = {}
    kept = group.prepare(ctx, prompts, seed=0)
    first = kept[0].rollout
    assert len(kept) == 12 and first["refilled_groups"] == 2 and first["short_groups"] == 0
    assert first["groups"] == 6 and first["equal_groups"] == 2
    rolled = [e.prompt for e in kept[::3]]
    assert sorted(map(tuple, rolled)) == sorted(tuple(ids) for _, ids in prompts[2:] + others)
    assert ctx.counts == {
        "groups": 6,
        "unscored_groups": 0,
        "equal_groups": 2,
        "refilled_groups": 2,
    }
    greeting = ("Greet Bob.", models.prompt_ids(ctx.tok, "Greet Bob."))
    ctx.pool = [*prompts, greeting]  # one fresh prompt, a greeting: it ties too, then none left
    kept = group.prepare(ctx, prompts, seed=0)
    assert kept[0].rollout["groups"] == 5 and kept[0].rollout["equal_groups"] == 3
    assert len(kept) == 6 and kept[0].rollout["short_groups"] == 2


def test_the_samplers_log_probs_are_the_trainers_and_a_mismatch_is_weighed(tiny_cfg, tiny_world):
    """The transformers sampler's log-probs of its own tokens equal the trainer's (the same
    model: no mismatch); a sampler that saw its tokens as twice as likely as the trainer
    does gets the tokens' terms weighed by 1/2 (tis), or kept (mask, within a cap of 3)."""
    ctx = _ctx(tiny_cfg, tiny_world, name="grpo", group_size=2)
    examples = group.prepare(ctx, _prompts(ctx), seed=0)
    ids, mask, resp = ctx.batch(examples)
    with torch.no_grad():
        trainer = models.token_logps(ctx.model, ids, mask) * resp
    sampler = rl.grid([e.rollout["sampler_logps"] for e in examples], resp)
    k3, worst, past = losses.mismatch(trainer, sampler, resp, 2.0)
    assert k3 < 1e-8 and worst < 1 + 1e-3 and past == 0
    for e in examples:
        e.rollout["sampler_logps"] = e.rollout["sampler_logps"] + math.log(2)
    ctx.model.eval()
    with torch.no_grad():
        plain, _ = group.loss(ctx, ctx.model, examples)  # rollout_correction=none
        ctx.cfg.update.rollout_correction = "tis"
        tis, said = group.loss(ctx, ctx.model, examples)
        ctx.cfg.update.rollout_correction, ctx.cfg.update.tis_cap = "mask", 3.0
        kept, _ = group.loss(ctx, ctx.model, examples)
    assert tis.tolist() == pytest.approx((plain / 2).tolist(), rel=1e-3, abs=1e-7)
    assert kept.tolist() == pytest.approx(plain.tolist())
    assert said["mismatch_max_ratio"] == pytest.approx(2.0, rel=1e-3)
    assert said["mismatch_k3"] == pytest.approx(0.5 - 1 + math.log(2), rel=1e-3)


def test_grid_and_rows_are_inverse(tiny_cfg, tiny_world):
    ctx = _ctx(tiny_cfg, tiny_world, name="ppo")
    examples = ctx.rollout(_prompts(ctx), seed=0)
    _, _, resp = ctx.batch(examples)
    values = [torch.arange(len(e.chosen), dtype=torch.float) + i for i, e in enumerate(examples)]
    back = rl.rows(rl.grid(values, resp), resp)
    assert all(torch.equal(a, b) for a, b in zip(values, back))


# a reward of each row's reference answer (its length, less a length penalty): rewards that
# differ by row only when each row's own answer reaches the function
BY_ANSWER = """
def by_answer(prompts, responses, answer):
    return [len(a) - 0.01 * len(r) for r, a in zip(responses, answer)]
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("rule", "reward"), [("ppo", "toy_length"), ("remax", "answer"), ("grpo", "answer")]
)
def test_on_policy_rule_end_to_end(rule, reward, tiny_cache, tiny_world, tmp_path):
    """PPO against a mixture (the reward model and a length penalty); ReMax and GRPO
    against a reward function that reads each prompt row's reference answer
    (prompts.fields)."""
    (tmp_path / "by_answer.py").write_text(BY_ANSWER)
    fn = f"{tmp_path / 'by_answer.py'}:by_answer"
    answer = [
        "reward.kind=function",
        "reward.train=false",
        f"reward.function={fn}",
        "prompts.fields=[answer]",
    ]
    cfg = compose_cfg(
        [
            "experiment=toy_tiny",
            f"update={rule}",
            *(answer if reward == "answer" else [f"reward={reward}"]),
            "generate=transformers",
            "iteration=2",
            f"runs_dir={tmp_path}",
            f"toy.cache_dir={tiny_cache}",
            "reward.num_pairs=100",
            # the sampler's tokens out of the loss where its probability and the trainer's
            # part (vLLM's: transformers samples with the trainer's numerics, so none here)
            *(["update.rollout_correction=mask", "update.tis_cap=2"] if rule == "grpo" else []),
        ]
    )
    rows = loop.run(cfg, tmp_path / "toy_tiny")
    run = tmp_path / "toy_tiny"
    upd = json.loads((run / "iter_000" / "update" / "_DONE.json").read_text())
    assert upd["rule"] == rule and upd["steps"] > 0 and upd["skipped_steps"] == 0
    if rule == "grpo":  # the correction ran on every step, and measured the mismatch
        log = [json.loads(x) for x in (run / "iter_000/update/train_log.jsonl").open()]
        assert upd["config"]["update"]["rollout_correction"] == "mask"
        assert all(r["mismatch_past_cap"] == 0 and r["mismatch_max_ratio"] < 2 for r in log)
    assert (run / "iter_000" / "update" / "adapter").exists()
    assert (run / "iter_000" / "update" / "value_head.pt").exists() == (rule == "ppo")
    per_prompt = cfg.update.group_size if rule == "grpo" else 1
    assert upd["peak_rss_mb"] > 0 and upd["responses"] == 16 * cfg.update.epochs * per_prompt
    assert not (run / "iter_000" / "generate").exists(), "on-policy rules run no best-of-n stages"
    assert rows[0]["update"] == rule and rows[0]["reward_mean"] == upd["reward_mean"]
    assert rows[0]["responses"] == upd["responses"] and rows[0]["kl_to_reference"] is not None
    if rule == "ppo":  # the value head is carried to the next iteration
        nxt = json.loads((run / "iter_001" / "update" / "_DONE.json").read_text())
        assert nxt["value_head_init"] == "${run}/iter_000/update/value_head.pt"  # can move
    # the card lists the settings this rule read, not another rule's
    card = (run / "iter_001" / "handoff" / "policy" / "README.md").read_text()
    assert ("kl_coef=" in card) == (rule != "grpo") and "label_smoothing" not in card
    assert "beta=" not in card
    assert ("clip_range=" in card) == (rule == "ppo")
    assert ("scale_rewards=" in card) == (rule == "grpo")
    # no best-of-n samples: the inspector and the trackers read the held-out ones
    best = runinfo.extremes(runinfo.scored(run, 1), 1)
    assert [r["rank"] for r in best] == ["best 1", "worst 1"] and "gold" in best[0]
    assert "generate" not in show.status(run) and "held-out" in show.samples(run, 1, 1, False)
    if reward == "toy_length":  # the rollouts were scored by both sources
        said = upd["config"]["rollout"]["reward"]["mixture"]
        assert [(p["name"], p["weight"]) for p in said] == [("model", 1.0), ("words", -0.02)]
    if reward == "answer":  # the rollouts were scored by the function: no reward model at all
        assert not (run / "reward_model").exists()
        said = upd["config"]["rollout"]["reward"]
        assert said["reward_function"] == "by_answer.py:by_answer" and said["fields"] == ["answer"]
        # the held-out rewards are the function's, from each row's own reference answer
        scored = runinfo.scored(run, 0, True).to_dict("records")
        answers = {
            r["prompt_id"]: json.loads(r["fields"])["answer"]
            for r in read_shards(run / "heldout").to_pylist()
        }
        want = [len(answers[r["prompt_id"]]) - 0.01 * len(r["response"]) for r in scored]
        assert scored and [r["reward"] for r in scored] == pytest.approx(want)
        assert len({len(a) for a in answers.values()}) > 1, "rewards that tell rows apart"


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["dpo", "ppo"])
def test_vllm_backend_never_calls_transformers_generate(
    rule, tiny_cache, tiny_world, tmp_path, monkeypatch
):
    """With generate.backend=vllm every sample comes from the engine: best-of-n, the
    held-out evaluation and its baseline, and the on-policy rollouts. (DPO's run labels
    with a reward function, the gold judge: its labels are the gold column.)"""
    from transformers import GenerationMixin

    def forbidden(*args, **kwargs):
        raise AssertionError("transformers generate() called with generate.backend=vllm")

    monkeypatch.setattr(GenerationMixin, "generate", forbidden)
    cfg = compose_cfg(
        [
            "experiment=toy_tiny",
            f"update={rule}",
            "generate=vllm",
            "iteration=1",
            f"runs_dir={tmp_path}",
            f"toy.cache_dir={tiny_cache}",
            "reward.num_pairs=100",
            "update.epochs=1",
            *(["reward=gold"] if rule == "dpo" else []),
        ]
    )
    try:
        rows = loop.run(cfg, tmp_path / "toy_tiny")
    finally:
        samplers.close_kept()
    assert rows[0]["update"] == rule and rows[0]["win_rate_vs_initial"] is not None
    upd = json.loads((tmp_path / "toy_tiny" / "iter_000" / "update" / "_DONE.json").read_text())
    if rule == "ppo":
        assert upd["timings"]["sampler_sample_s"] > 0, "the rollouts came from the engine"
        # the engine's log-probs of its own tokens against the trainer's: float32 both, on
        # the same weights (synced), so close; measured, not assumed
        log = [
            json.loads(x)
            for x in (tmp_path / "toy_tiny" / "iter_000" / "update" / "train_log.jsonl")
            .read_text()
            .splitlines()
        ]
        assert all(0 <= r["mismatch_k3"] < 1e-3 and 1 <= r["mismatch_max_ratio"] < 1.1 for r in log)
    else:  # labelled by the reward function: each reward is the gold judge's score
        labels = read_shards(tmp_path / "toy_tiny" / "iter_000" / "label").to_pylist()
        assert labels and all(r["reward"] == r["gold"] for r in labels)
        assert not (tmp_path / "toy_tiny" / "reward_model").exists()


def test_what_a_group_rule_needs_is_checked_at_start_up():
    from iterate.errors import BadInput
    from iterate.run import validate

    for rule in ("grpo", "rloo", "reinforce_pp"):
        validate.check(compose_cfg([f"update={rule}"]))
    # a comparing reward ranks a group's samples by a tournament, as it does best-of-n's
    validate.check(compose_cfg(["update=grpo", "reward=toy_pairwise"]))
    validate.check(compose_cfg(["update=rloo", "reward=toy_judge"]))
    for extra, says in [
        (["update.group_size=1"], "update.group_size=1: must be >= 2"),
        (["generate.temperature=0"], "a group's samples all alike"),
        (["update.clip_low=1.0"], "update.clip_low=1.0: must be in"),
        (["update.tis_cap=1.0"], "update.tis_cap=1.0: must be > 1"),
        (["update.overlong_buffer=48"], "update.overlong_buffer=48: must be in"),
        (["update.loss_agg=token_sum"], "token_sum"),
        (["update.scale_rewards=prompt"], "scale_rewards"),
    ]:
        with pytest.raises((BadInput, Exception), match=says):
            validate.check(compose_cfg(["update=grpo", *extra]))


def constant(prompts, responses):
    return [1.0] * len(responses)


def infinite(prompts, responses):
    return [math.inf] * len(responses)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fn", "extra", "said"),
    [
        ("constant", ["update.drop_equal_groups=true", "update.refill_rounds=2"], "equal groups"),
        ("infinite", [], "unscored groups"),
    ],
)
def test_an_update_that_saw_no_data_is_not_handed_off(fn, extra, said, tiny_cache, tmp_path):
    """A reward that gives every response of a prompt the same score, with equal groups left
    out, or one that is never a finite number: every step of GRPO's update has nothing to
    learn from. Each such step is logged as empty with no optimiser step, and the update is
    refused as bad input naming why, before anything is evaluated or handed off."""
    from iterate.errors import BadInput

    cfg = compose_cfg(
        [
            "experiment=toy_tiny",
            "update=grpo",
            "reward.kind=function",
            "reward.train=false",
            f"reward.function=tests.test_rl:{fn}",
            "generate=transformers",
            "iteration=1",
            f"runs_dir={tmp_path}",
            f"toy.cache_dir={tiny_cache}",
            *extra,
        ]
    )
    run = tmp_path / "toy_tiny"
    with pytest.raises(BadInput, match=f"the update saw no data: .*{said}"):
        loop.run(cfg, run)
    lines = (run / "iter_000/update/train_log.jsonl").read_text().splitlines()
    log = [json.loads(x) for x in lines]
    assert log and all(row["empty"] and row["examples"] == 0 for row in log)
    assert not (run / "iter_000/update/_DONE.json").exists()
    assert not (run / "iter_000/evaluate").exists() and not (run / "iter_000/handoff").exists()
    stopped = json.loads((run / "_STOPPED.json").read_text())
    assert stopped["status"] == 2


def test_sequence_mean_divides_by_the_responses_in_the_loss():
    """With mask_truncated, a response cut at the length limit is out of the loss: under
    loss_agg=sequence_mean the step's loss is the mean over the responses left in it (the
    step's share of them, ``step_in_loss_share``), not over every response rolled out."""
    cfg = compose_cfg(["update=grpo", "update.loss_agg=sequence_mean"])
    ctx = rl.Context(cfg, None, None, torch.device("cpu"), None, None, None)
    per_token = torch.tensor([[1.0, 3.0, 0.0], [2.0, 2.0, 2.0], [5.0, 0.0, 0.0]])
    resp = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])  # the last: cut
    mb = [common.Example([1], [2, 3], rollout={"step_in_loss_share": 2 / 3}) for _ in range(3)]
    per_example = rl.aggregate(ctx, per_token, mb, resp)
    assert per_example.mean().item() == pytest.approx((2.0 + 2.0) / 2)


@pytest.mark.slow
def test_a_pair_rule_with_a_reward_that_scores_nothing_says_so(tiny_cache, tmp_path):
    """A reward that is never a finite number leaves DPO no pairs: the run stops as bad
    input naming the label stage and what the reward did, not ties and ``generate.n``."""
    from iterate.errors import BadInput

    cfg = compose_cfg(
        [
            "experiment=toy_tiny",
            "update=dpo",
            "reward.kind=function",
            "reward.train=false",
            "reward.function=tests.test_rl:infinite",
            "generate=transformers",
            "iteration=1",
            f"runs_dir={tmp_path}",
            f"toy.cache_dir={tiny_cache}",
        ]
    )
    with pytest.raises(
        BadInput,
        match=r"iter_000/label: the reward scored none of the \d+ "
        r"responses .*non_finite_reward.*check reward.function",
    ):
        loop.run(cfg, tmp_path / "toy_tiny")


def digits(prompts, responses):
    """A tiny verifiable reward a policy can learn in a few steps: the share of an answer's
    characters that are digits, times 10 (every token's choice counts, and no greedy answer
    already earns it all: ReMax's baseline leaves room)."""
    return [10 * sum(c.isdigit() for c in r) / max(1, len(r)) for r in responses]


@pytest.mark.parametrize("rule", ["grpo", "rloo", "reinforce_pp", "ppo", "remax"])
def test_every_on_policy_rule_raises_a_reward_it_can_learn(tiny_cfg, tiny_world, rule):
    """The learning signal of each on-policy family: 8 optimiser steps (AdamW; PPO's passes
    per rollout) of the rule's own rollouts, advantages and loss on a reward the tiny policy
    can learn at once raise its mean on fresh samples of the same prompts several times over
    (0.23 before; after: GRPO, RLOO, REINFORCE++ about 9, PPO 3, ReMax 1.1). The whole
    policy trains (no LoRA: the tiny policy's adapter is too small to move in 8 steps)."""
    from iterate import rewards
    from iterate.stages.update import training

    tiny_cfg.update.lora.enabled = False
    frozen = models.load_policy(str(tiny_world), "float32", torch.device("cpu"))
    ctx = _ctx(tiny_cfg, tiny_world, frozen, name=rule, group_size=4, kl_coef=0.0)
    ctx.reward = rewards.FunctionReward("tests.test_rl:digits")
    rule_of = {"ppo": ppo.ON_POLICY, "remax": remax.ON_POLICY}.get(rule, group.ON_POLICY)
    prompts = _prompts(ctx) * (1 if rule_of is group.ON_POLICY else 4)  # 16 rollouts a step
    params = training.trainable(ctx.model, *([ctx.head] if ctx.head is not None else []))
    opt = torch.optim.AdamW(params, lr=3e-2)

    def mean_reward() -> float:
        got = [e.rollout["score"] for e in ctx.rollout(_prompts(ctx) * 2, seed=1000, n=8)]
        return sum(got) / len(got)

    before = mean_reward()
    for step in range(8):
        ctx.model.eval()
        ctx.sampler.sync(ctx.model, ctx.tok, str(tiny_world))
        with torch.no_grad():
            examples = rule_of.prepare(ctx, prompts, step)
        ctx.model.train()
        for _ in range(rule_of.passes(ctx.cfg)):
            opt.zero_grad()
            rule_of.loss(ctx, ctx.model, examples)[0].sum().backward()
            opt.step()
    ctx.model.eval()
    ctx.sampler.sync(ctx.model, ctx.tok, str(tiny_world))
    after = mean_reward()
    assert after > 3 * before > 0, (rule, before, after)


@pytest.mark.parametrize("rule", ["grpo", "rloo"])
def test_the_group_rules_options_reach_their_advantages_and_loss_by_hand(
    tiny_cfg, tiny_world, rule
):
    """The options the by-hand test above leaves at their defaults, worked out here from the
    rollouts: GRPO with DAPO's over-length penalty in the reward, the batch's std
    (``scale_rewards=batch``; ``none``: centred only), a k3 KL to the reference in the loss
    (``kl_loss_coef``), two passes per rollout (``num_iterations``: the ratio against the
    log-probs before the first) and ``token_sum_norm``; RLOO with its sequence KL
    (``kl_coef``) taken from the reward before the leave-one-out baseline."""
    n, max_tokens = 3, tiny_cfg.generate.max_tokens
    opts = dict(name=rule, group_size=n, reward_clip=100.0, loss_agg="token_sum_norm")
    if rule == "grpo":
        opts |= dict(scale_rewards="batch", overlong_buffer=8, kl_loss_coef=0.1, num_iterations=2)
    else:
        opts |= dict(kl_coef=0.1)
    ctx = _ctx(tiny_cfg, tiny_world, **opts)
    _nonzero_adapter(ctx.model)  # the policy differs from its reference (adapter disabled)
    ctx.model.eval()
    examples = group.prepare(ctx, _prompts(ctx), seed=0)
    ids, mask, resp = ctx.batch(examples)
    with torch.no_grad():
        now = models.token_logps(ctx.model, ids, mask) * resp
        with ctx.model.disable_adapter():
            ref = models.token_logps(ctx.model, ids, mask) * resp
    scores = torch.tensor([e.rollout["score"] for e in examples], dtype=torch.float64)
    lengths = torch.tensor([len(e.chosen) for e in examples], dtype=torch.float64)
    adv = [e.rollout["advantages"] for e in examples]
    if rule == "grpo":
        assert all("kl" not in e.rollout for e in examples)  # GRPO's KL is the loss's
        start = max_tokens - 8
        scores = scores + ((start - lengths) / 8).clamp(-1, 0)
        s = scores.view(-1, n)
        want = ((s - s.mean(-1, keepdim=True)) / (s.std() + 1e-4)).flatten()
        old = rl.grid([e.rollout["old_logps"] for e in examples], resp)
        assert torch.allclose(old, now, atol=1e-5)
        with torch.no_grad():  # an optimiser pass moved the policy: the ratio is not 1
            for name, p in ctx.model.named_parameters():
                if "lora_A" in name:
                    p.mul_(1.3)
        ctx.cfg.update.scale_rewards = "none"  # (read by prepare only: the other scaling)
        centred = group.prepare(ctx, _prompts(ctx), seed=1)
        s2 = torch.tensor([e.rollout["score"] for e in centred], dtype=torch.float64)
        s2 = s2 + ((start - torch.tensor([len(e.chosen) for e in centred])) / 8).clamp(-1, 0)
        s2 = s2.view(-1, n)
        got = [float(e.rollout["advantages"][0]) for e in centred]
        assert got == pytest.approx((s2 - s2.mean(-1, keepdim=True)).flatten().tolist(), abs=1e-6)
    else:
        kl = (now - ref) * resp  # k1 on the sampled tokens
        s = (scores - 0.1 * kl.sum(-1).double()).view(-1, n)
        want = (s - (s.sum(-1, keepdim=True) - s) / (n - 1)).flatten()
    assert [float(a[0]) for a in adv] == pytest.approx(want.tolist(), abs=1e-5)
    assert all(torch.all(a == a[0]) for a in adv)  # one advantage per sequence
    per_example, metrics = group.loss(ctx, ctx.model, examples)  # (eval: no LoRA dropout)
    with torch.no_grad():
        lp = models.token_logps(ctx.model, ids, mask) * resp
        old = rl.grid([e.rollout["old_logps"] for e in examples], resp) if rule == "grpo" else lp
        a = rl.grid(adv, resp)
        ratio = (lp - old).exp()
        surrogate = -torch.min(ratio * a, ratio.clamp(0.8, 1.2) * a)
        if rule == "grpo":
            assert (ratio - 1).abs().max() > 1e-3
            k3 = (ref - lp).exp() - 1 - (ref - lp)
            surrogate = surrogate + 0.1 * k3
        want_loss = (surrogate * resp).sum(-1) / max_tokens
    assert per_example.tolist() == pytest.approx(want_loss.tolist(), rel=1e-4, abs=1e-6)
    assert metrics["kl"] != 0  # (k3 in GRPO's loss; RLOO's k1 in its reward)
