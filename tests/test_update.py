"""Update machinery on the tiny toy policy: LoRA-only changes, accumulation equivalence,
padding-invariant log-probs, skipped non-finite steps."""

import json
import math
from pathlib import Path

import pytest
import torch

from iterate.stages.update import common, dpo, raft, training
from iterate.store.stage import Stage
from iterate.train import models

PAIRS = [
    ("Greet Anna.", "Hello Anna!", "Ugh, Hello Rosa! Stop asking."),
    ("What is 2 plus 3?", "Sure! 2 plus 3 is 5.", "2 plus 3 is 7."),
    ("Count from 1 to 4.", "1, 2, 3, 4.", "Whatever, 1, 2, 4. Boring."),
    ("Name 2 fruits.", "Sure! apple, pear.", "apple."),
]


def _examples(tok):
    return [
        common.Example(
            models.prompt_ids(tok, p), models.response_ids(tok, c), models.response_ids(tok, r)
        )
        for p, c, r in PAIRS
    ]


@pytest.fixture
def setup(tiny_cfg, tiny_world, tmp_path):
    cfg = tiny_cfg
    cfg.update.lora.dropout = 0.0  # deterministic forward passes
    tok = models.load_tokenizer(str(tiny_world))
    return cfg, tok, str(tiny_world), tmp_path


def _stage(tmp_path, name="update"):
    return Stage(tmp_path / name, "update", {})


def _with_reference(cfg, tok, policy):
    """The policy to train (LoRA), its pairs, and their reference log-probs (the policy
    itself before any step)."""
    dev = torch.device("cpu")
    model = common.policy_model(cfg, policy, dev)
    ex = _examples(tok)
    common.reference_logps(cfg, model, tok, ex, policy, policy, dev)
    return model, ex, dev


def _train(cfg, model, examples, loss_fn, stage):
    """The one training loop over the pair rules' batch source."""
    total = cfg.update.epochs * common.steps_per_epoch(cfg, len(examples))
    steps = common.pair_steps(cfg, examples, 0)
    return training.train(cfg, model, training.trainable(model), steps, total, loss_fn, stage, 0)


def test_left_and_right_padding_give_equal_logps(setup):
    cfg, tok, policy, _ = setup
    model = models.load_policy(policy)
    ex = _examples(tok)
    seqs = [e.prompt + e.chosen for e in ex]
    out = []
    for side in ("right", "left"):
        ids, mask = models.pad(seqs, tok.pad_token_id, side)
        lp = models.token_logps(model, ids, mask)
        out.append(lp.sum(-1))
    assert out[0].tolist() == pytest.approx(out[1].tolist(), abs=1e-4)
    single = [
        models.token_logps(model, *models.pad([s], tok.pad_token_id)).sum().item() for s in seqs
    ]
    assert out[0].tolist() == pytest.approx(single, abs=1e-4)


def test_only_lora_parameters_change(setup):
    cfg, tok, policy, tmp_path = setup
    cfg.update.lr = 1e-2
    dev = torch.device("cpu")
    model = common.policy_model(cfg, policy, dev)
    ex = _examples(tok)
    common.reference_logps(cfg, model, tok, ex, policy, policy, dev)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = _train(cfg, model, ex, lambda m, b: dpo.loss_fn(cfg)(m, tok, b, dev), _stage(tmp_path))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert result["steps"] >= 1 and result["skipped_steps"] == 0
    assert changed, "the update changed something"
    assert all("lora_" in n for n in changed), sorted(changed)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_reference_is_the_adapter_disabled_policy(setup):
    cfg, tok, policy, tmp_path = setup
    dev = torch.device("cpu")
    model = common.policy_model(cfg, policy, dev)
    ex = _examples(tok)
    plain = models.load_policy(policy)
    common.reference_logps(cfg, model, tok, ex, policy, policy, dev)
    expected = common.logps(plain, tok, ex, "chosen", dev)[0].tolist()
    assert [e.ref["chosen"] for e in ex] == pytest.approx(expected, abs=1e-4)


def test_micro_batch_times_accumulation_equivalence(setup):
    cfg, tok, policy, _ = setup
    model, ex, dev = _with_reference(cfg, tok, policy)
    model.train()
    grads, losses, padding = [], [], []
    # a token budget that lets the two shortest pairs share a micro-batch, no more
    budget = models.padded_tokens(sorted(ex, key=lambda e: sum(e.lengths()))[:2])
    # 4 x 1, 2 x 2 and 1 x 4 accumulation steps; then rows of 4 under the token budget
    for micro, max_tokens in ((4, 0), (2, 0), (1, 0), (4, budget)):
        model.zero_grad(set_to_none=True)
        loss, metrics = training.accumulate(
            model, ex, lambda m, b: dpo.loss_fn(cfg)(m, tok, b, dev), micro, max_tokens
        )
        losses.append((loss, metrics["policy_chosen_logps"]))
        padding.append(metrics["padding"])
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert len(models.micro_batches(ex, 4, budget)) == 3
    for other in losses[1:]:
        assert other[0] == pytest.approx(losses[0][0], abs=1e-6)
    assert losses[0][1] == pytest.approx(losses[2][1], abs=1e-4)  # metrics are example-weighted too
    assert any(g.abs().sum() > 0 for g in grads[0].values())
    for other in grads[1:]:
        for n in grads[0]:
            assert torch.allclose(grads[0][n], other[n], atol=1e-6), n
    # the padding fed, by hand: one batch of four pads to the longest; a batch of one pads
    # only a pair's shorter response to its longer (both run on top of its prompt, once)
    real = sum(sum(e.lengths()) for e in ex)
    assert padding[0] == pytest.approx(1 - real / models.padded_tokens(ex)) and padding[0] > 0
    alone = sum(len(e.prompt) + 2 * max(len(e.chosen), len(e.rejected)) for e in ex)
    assert padding[2] == pytest.approx(1 - real / alone) and padding[2] < padding[0]
    assert 0 < padding[3] < padding[0]


def test_gradient_checkpointing_gives_the_same_gradients(setup):
    """Activations recomputed in the backward pass: the same loss and gradients, LoRA and
    whole model alike."""
    cfg, tok, policy, _ = setup
    dev = torch.device("cpu")
    for lora in (True, False):
        cfg.update.lora.enabled = lora
        seen = []
        for checkpointing in (False, True):
            cfg.update.gradient_checkpointing = checkpointing
            torch.manual_seed(0)  # the same LoRA initialisation
            model = common.policy_model(cfg, policy, dev)
            assert model.is_gradient_checkpointing == checkpointing
            ex = _examples(tok)
            common.reference_logps(cfg, model, tok, ex, policy, policy, dev)
            if lora:  # a LoRA B of zeros gives a zero gradient to every A: make it count
                for n, p in model.named_parameters():
                    if "lora_B" in n:
                        p.data.normal_(0, 0.1)
            model.train()
            loss, _ = training.accumulate(
                model, ex, lambda m, b: dpo.loss_fn(cfg)(m, tok, b, dev), 2
            )
            seen.append((loss, [p.grad.clone() for p in model.parameters() if p.requires_grad]))
        (loss0, g0), (loss1, g1) = seen
        assert loss1 == pytest.approx(loss0, abs=1e-6)
        assert any(g.abs().sum() > 0 for g in g0)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g0, g1, strict=True))


def test_non_finite_loss_skips_the_step(setup):
    cfg, tok, policy, tmp_path = setup
    dev = torch.device("cpu")
    model = common.policy_model(cfg, policy, dev)
    ex = _examples(tok)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def nan_loss(m, batch):
        per_example, _ = raft.loss_fn(m, tok, batch, dev)
        return per_example * float("nan"), {}

    cfg.update.micro_batch_size, cfg.update.epochs = 2, 1
    stage = _stage(tmp_path)
    result = _train(cfg, model, ex, nan_loss, stage)
    assert result == {"steps": 2, "skipped_steps": 2, "empty_steps": 0, "final": result["final"]}
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
    log = [json.loads(line) for line in (stage.path / "train_log.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in log] == [True, True]


def test_raft_loss_lowers_nll_of_best(setup):
    cfg, tok, policy, tmp_path = setup
    cfg.update.lr, cfg.update.epochs, cfg.update.micro_batch_size = 1e-2, 3, 4
    dev = torch.device("cpu")
    model = common.policy_model(cfg, policy, dev)
    ex = _examples(tok)
    first = raft.loss_fn(model, tok, ex, dev)[0].mean().item()
    _train(cfg, model, ex, lambda m, b: raft.loss_fn(m, tok, b, dev), _stage(tmp_path))
    assert raft.loss_fn(model, tok, ex, dev)[0].mean().item() < first
    assert Path(tmp_path / "update" / "train_log.jsonl").exists()


def test_a_rule_stage_depends_only_on_the_settings_it_reads(tmp_path):
    from iterate.stages.update.common import stage_for
    from iterate.store.paths import Paths

    from .conftest import compose_cfg

    paths = Paths(run=tmp_path, base_policy="p")
    cfg = compose_cfg(["update=dpo"])
    base = stage_for(cfg, paths, 0, "p", "p").config
    cfg.update.clip_range = 0.5  # a PPO knob: DPO's finished stages stay valid
    assert stage_for(cfg, paths, 0, "p", "p").config == base
    cfg.update.beta = 0.5
    assert stage_for(cfg, paths, 0, "p", "p").config["update"]["beta"] == 0.5


def test_the_rule_table_is_torch_free_and_names_every_rule_and_setting():
    """The loop, the validation, the report and the inspector read the table without
    importing a rule's code; every configurable rule has a row, each row a module with a
    ``run``, and every update setting is read by some rule (or by all)."""
    import dataclasses
    import subprocess
    import sys

    from iterate.config import UpdateConfig, UpdateRule
    from iterate.stages.update.common import SHARED_KEYS
    from iterate.train import rules

    code = (
        "import sys, iterate.train.rules, iterate.run.loop, iterate.run.validate; "
        "print('torch' in sys.modules)"
    )
    assert (
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.strip()
        == "False"
    )
    assert set(rules.RULES) == {str(r) for r in UpdateRule}
    for r in rules.RULES.values():
        assert callable(__import__(f"iterate.stages.update.{r.module}", fromlist=["run"]).run)
        assert (r.keep is None) == r.on_policy and "{" not in r.samples.format(
            n=8, pairs="x", group=4
        )
    read = {k for r in rules.RULES.values() for k in r.keys} | set(SHARED_KEYS)
    settings = {f.name for f in dataclasses.fields(UpdateConfig)}
    assert {k for r in rules.RULES.values() for k in r.keys} <= settings, "no unknown key"
    how = {"num_processes", "strategy", "max_tokens_per_micro_batch", "gradient_checkpointing"}
    assert settings - read <= how, "how it runs, not what it makes"
    assert rules.between("dpo", True) == ("generate", "reward", "label", "pairs")
    assert rules.between("ppo", False) == ()


@pytest.mark.parametrize("name", ["dpo", "raft", "ppo", "remax", "grpo", "rloo", "reinforce_pp"])
def test_a_setting_only_another_rule_reads_is_said_at_start_up(name, caplog):
    """No preset sets another rule's settings; one set by hand is said (a sweep over rules
    shares its overrides, so it is not refused), naming the rule's own settings."""
    import logging

    from iterate.run import validate
    from iterate.train import rules

    from .conftest import compose_cfg

    for preset in ([], ["experiment=instruct"]):
        assert rules.unread(compose_cfg([*preset, f"update={name}"]).update) == []
    other = "clip_high=0.3" if name in ("dpo", "raft", "ppo", "remax") else "beta=0.5"
    cfg = compose_cfg([f"update={name}", f"update.{other}"])
    assert rules.unread(cfg.update) == [other.split("=")[0]]
    with caplog.at_level(logging.WARNING, logger="iterate.run.validate"):
        validate.check(cfg)
    said = f"update={name} does not read update.{other} (another rule's); its own settings: "
    assert said in caplog.text and ", ".join(rules.rule(name).keys or ["none"])[:8] in caplog.text


def test_dpo_lowers_its_loss_on_its_pairs(setup):
    """DPO trained on its pairs: the loss on them goes down from log 2 (the policy is its
    own reference at the start) and the implicit reward ranks every chosen response
    first. A sign or reference slip in the loss sends it the other way."""
    cfg, tok, policy, tmp_path = setup
    cfg.update.lr, cfg.update.epochs, cfg.update.micro_batch_size = 1e-2, 8, 4
    torch.manual_seed(0)  # the LoRA initialisation (seeds 0-2 all pass)
    model, ex, dev = _with_reference(cfg, tok, policy)
    fn = dpo.loss_fn(cfg)
    first, stats = fn(model, tok, ex, dev)
    assert first.mean().item() == pytest.approx(math.log(2), abs=1e-5)
    assert stats["reward_margin"] == pytest.approx(0.0, abs=1e-5)
    _train(cfg, model, ex, lambda m, b: fn(m, tok, b, dev), _stage(tmp_path))
    last, stats = fn(model, tok, ex, dev)
    assert last.mean().item() < 0.75 * first.mean().item()  # 0.43 of 0.69 measured
    assert stats["reward_margin"] > 0 and stats["reward_accuracy"] == 1.0


def test_the_nll_term_adds_the_chosen_responses_mean_nll(setup):
    """``update.nll_coef``: DPO's loss plus coef x the chosen response's per-token NLL."""
    cfg, tok, policy, _ = setup
    model, ex, dev = _with_reference(cfg, tok, policy)
    cfg.update.nll_coef = 0.0
    plain, _ = dpo.loss_fn(cfg)(model, tok, ex, dev)
    cfg.update.nll_coef = 0.5
    with_nll, _ = dpo.loss_fn(cfg)(model, tok, ex, dev)
    _, tokens, mask = common.logps(model, tok, ex, "chosen", dev)
    by_hand = -(tokens * mask).sum(-1) / mask.sum(-1)  # the chosen response's mean NLL
    assert torch.allclose(with_nll - plain, 0.5 * by_hand, atol=1e-5)
    assert (by_hand > 0).all()


def test_a_whole_model_update_is_handed_off_without_a_second_copy(setup):
    """A full model the update saved in the policy's dtype is linked into the handoff, the
    same bytes on disk once (hard links), and loads as the same model; in another dtype it
    is loaded, cast and written anew."""
    from iterate.stages import handoff

    cfg, _, policy, tmp = setup
    trained = Path(policy)
    handoff.merge(cfg, "", trained, False, tmp / "linked")
    for f in trained.iterdir():
        assert (tmp / "linked" / f.name).stat().st_ino == f.stat().st_ino, f.name
    a, b = models.load_policy(policy), models.load_policy(str(tmp / "linked"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    cfg.model.dtype = "bfloat16"
    handoff.merge(cfg, "", trained, False, tmp / "cast")
    weights = tmp / "cast" / "model.safetensors"
    assert weights.stat().st_ino != (trained / "model.safetensors").stat().st_ino
    assert json.loads((tmp / "cast" / "config.json").read_text())["dtype"] == "bfloat16"


def test_a_bf16_policy_trains_in_float32_weights_and_moves_at_a_small_lr(setup):
    """model.dtype=bfloat16: the weights AdamW updates are float32 (LoRA's adapter, or the
    whole model), the forward computes in bf16 under autocast, and one step at lr 1e-6
    moves the weights. In bf16 itself that step rounds away: 0.02 - 1e-6 is 0.02."""
    cfg, tok, policy, _ = setup
    small = torch.tensor(0.02, dtype=torch.bfloat16)
    assert small - 1e-6 == small  # why: 8 bits of mantissa
    dev = torch.device("cpu")
    cfg.model.dtype = "bfloat16"
    for lora in (True, False):
        cfg.update.lora.enabled = lora
        torch.manual_seed(0)
        model = common.policy_model(cfg, policy, dev)
        trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
        frozen = [p for p in model.parameters() if not p.requires_grad]
        assert trained and all(p.dtype == torch.float32 for p in trained.values())
        assert all(p.dtype == torch.bfloat16 for p in frozen) and bool(frozen) == lora
        ex = _examples(tok)
        ids, mask = models.pad([e.prompt + e.chosen for e in ex], tok.pad_token_id)
        assert models.forward(model, ids, mask).logits.dtype == torch.bfloat16  # bf16 compute
        common.reference_logps(cfg, model, tok, ex, policy, policy, dev)
        if lora:  # a LoRA B of zeros gives every A a zero gradient
            for n, p in trained.items():
                if "lora_B" in n:
                    p.data.normal_(0, 0.1)
        before = {n: p.detach().clone() for n, p in trained.items()}
        opt = torch.optim.AdamW(list(trained.values()), lr=1e-6, weight_decay=0.0)
        model.train()
        training.accumulate(model, ex, lambda m, b: dpo.loss_fn(cfg)(m, tok, b, dev), 4)
        opt.step()
        moved = [n for n, p in trained.items() if not torch.equal(p, before[n])]
        assert len(moved) > len(trained) // 2, (lora, len(moved), len(trained))
        step = max((trained[n] - before[n]).abs().max().item() for n in moved)
        assert step == pytest.approx(1e-6, rel=0.05)  # Adam's first step: lr in size
