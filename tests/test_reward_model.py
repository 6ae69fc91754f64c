"""Reward-model training end to end on tiny models: toy pairs and an HH-format file."""

import json
import math

import pytest
import torch

from iterate.rewards import scorer as scoring
from iterate.stages import reward_model
from iterate.store.paths import Paths
from iterate.store.stage import StageConfigChanged

from .conftest import ROOT


def _paths(cfg, world) -> Paths:
    from pathlib import Path

    return Paths(run=Path(cfg.runs_dir) / cfg.run_name, base_policy=str(world), toy=world)


def test_toy_reward_model_trains_records_and_skips(tiny_cfg, tiny_world):
    paths = _paths(tiny_cfg, tiny_world)
    done = reward_model.train(tiny_cfg, paths)
    rm_dir = paths.reward_model_dir
    assert (rm_dir / "_DONE.json").exists() and (rm_dir / "model" / "config.json").exists()
    for key in (
        "heldout_accuracy",
        "loss_curve",
        "train_pairs",
        "heldout_pairs",
        "parameters",
        "dropped",
        "config_hash",
    ):
        assert key in done
    assert done["train_pairs"] + done["heldout_pairs"] == tiny_cfg.reward.num_pairs
    assert 0.0 <= done["heldout_accuracy"] <= 1.0
    assert done["trainable_parameters"] < done["parameters"], "LoRA trains a fraction"
    log = [json.loads(line) for line in (rm_dir / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == done["steps"] > 0

    # the merged model loads as a plain sequence classifier and scores with one label
    scorer = scoring.Scorer.load(str(rm_dir / "model"), "float32", 64, 8)
    scores = scorer.score(["Greet Anna."] * 2, ["Hello Anna!", "Ugh, Hello Rosa! Stop asking."])
    assert len(scores) == 2 and all(torch.isfinite(torch.tensor(scores)))

    # finished: a second call does nothing; a changed config is refused with the key named
    assert reward_model.train(tiny_cfg, paths)["finished_at"] == done["finished_at"]
    tiny_cfg.reward.lr = 0.5
    with pytest.raises(StageConfigChanged, match="reward.lr"):
        reward_model.train(tiny_cfg, paths)


def test_reward_model_learns_the_gold_preference(tiny_cfg, tiny_world):
    """Trained on noisy gold-labelled toy pairs, the reward model ranks held-out pairs
    (gold labels, no noise) well above chance, and its held-out BT loss is below log 2."""
    tiny_cfg.reward.num_pairs, tiny_cfg.reward.epochs = 800, 2
    done = reward_model.train(tiny_cfg, _paths(tiny_cfg, tiny_world))
    assert done["heldout_pairs"] == 80
    assert done["heldout_accuracy"] >= 0.7, done["heldout_accuracy"]
    assert done["heldout_loss"] < 0.6931


def test_score_is_order_independent(tiny_world):
    from iterate.errors import BadInput

    with pytest.raises(BadInput, match="not a reward model"):  # a causal LM: no score head
        scoring.load_model(str(tiny_world))
    model, tok = scoring.load_model(str(tiny_world), new_head=True)  # a random head, asked for
    responses = ["1, 2, 3.", "Sure! " * 5 + "1, 2, 3.", "no"]
    prompts = ["Count from 1 to 3."] * 3
    batched = scoring.Scorer(model, tok, 128, batch_size=3).score(prompts, responses)
    single = [
        scoring.Scorer(model, tok, 128, batch_size=1).score([p], [r])[0]
        for p, r in zip(prompts, responses)
    ]
    assert batched == pytest.approx(single, abs=1e-4), (
        "padding and length-sorting do not change rewards"
    )


RM_TEMPLATE = (
    "{% for m in messages %}{{ bos_token }}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
)


def test_templates_differ_rm_template_is_applied_without_double_bos(tiny_world):
    from iterate.train import models

    policy_tok = models.load_tokenizer(str(tiny_world))
    rm_tok = models.load_tokenizer(str(tiny_world), template=RM_TEMPLATE)
    messages = [{"role": "user", "content": "Greet Anna."}]
    ids = scoring.encode(rm_tok, messages, "Hello Anna!", 128)
    text = rm_tok.decode(ids)
    assert text.startswith("<s>### user: Greet Anna.")
    assert "### assistant: Hello Anna!" in text and "<|assistant|>" not in text
    policy_text = policy_tok.decode(scoring.encode(policy_tok, messages, "Hello Anna!", 128))
    assert policy_text != text and "<|assistant|>" in policy_text
    assert (
        ids[0] == rm_tok.bos_token_id and ids.count(rm_tok.bos_token_id) == 2
    )  # one per turn, as the RM template says
    # the scorer renders a stored prompt (text or JSON messages) the same way
    scorer = scoring.Scorer(None, rm_tok, 128)
    assert scorer.encode("Greet Anna.", "Hello Anna!") == ids
    assert scorer.encode(json.dumps(messages), "Hello Anna!") == ids
    # a tokenizer with no template gets the HH transcript
    rm_tok.chat_template = None
    hh = rm_tok.decode(
        scoring.encode(rm_tok, messages, "Hello Anna!", 128), skip_special_tokens=True
    )
    assert hh == "\n\nHuman: Greet Anna.\n\nAssistant: Hello Anna!"


def test_non_finite_rewards_are_dropped_and_counted(tiny_world):
    import pyarrow as pa

    from iterate.rewards import GOLD, FunctionReward
    from iterate.stages import label
    from iterate.store.shards import SCHEMAS

    model, tok = scoring.load_model(str(tiny_world), new_head=True)  # a random head
    poison = tok("Rosa", add_special_tokens=False)["input_ids"]
    with torch.no_grad():  # a real model whose reward is NaN for any sequence holding this token
        model.get_input_embeddings().weight[poison[0]] = float("nan")
    responses = ["Hello Anna!", "Hello Rosa!", "Sure! Hello Anna!"]
    n = len(responses)
    gen = pa.table(
        {
            "prompt_id": [f"p{i}" for i in range(n)],
            "sample_idx": [0] * n,
            "prompt": ["Greet Anna."] * n,
            "response": responses,
            "prompt_tokens": [5] * n,
            "response_tokens": [3] * n,
            "finish_reason": ["stop"] * n,
            "response_ids": [[1]] * n,
        },
        schema=SCHEMAS["generate"],
    )
    texts = gen["prompt"].to_pylist(), gen["response"].to_pylist()
    rewards = scoring.Scorer(model, tok, 128).score(*texts)
    table, dropped = label.label_table(gen, rewards, gold=FunctionReward(GOLD).score(*texts))
    assert dict(dropped) == {"non_finite_reward": 1}
    assert table["prompt_id"].to_pylist() == ["p0", "p2"]
    assert all(r == r for r in table["reward"].to_pylist())  # no NaN kept, none turned into 0
    assert table["gold"].to_pylist() == [1.0, 1.25]


def test_hh_reward_model_full_finetune_reports_dropped_rows(tiny_cfg, tiny_world):
    from iterate.config import PreferenceFile

    tiny_cfg.reward.source = "files"
    tiny_cfg.reward.data = [PreferenceFile(path=str(ROOT / "data" / "hh_fixture.jsonl"))]
    tiny_cfg.reward.lora.enabled = False
    tiny_cfg.reward.heldout_fraction = 0.25
    tiny_cfg.reward.batch_size = 4
    done = reward_model.train(tiny_cfg, _paths(tiny_cfg, tiny_world))
    assert done["dropped"] == {
        "no_assistant_turn": 1,
        "empty_response": 1,
        "identical_responses": 1,
    }
    assert done["rows"] == 27 and done["train_pairs"] + done["heldout_pairs"] == 24
    assert done["heldout_pairs"] > 0
    assert done["trainable_parameters"] == done["parameters"], "full fine-tuning"


def test_encode_never_doubles_bos(tiny_world):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_world)
    ids = scoring.encode(tok, [{"role": "user", "content": "Greet Anna."}], "Hello Anna!", 64)
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert ids[-1] == tok.eos_token_id


def test_the_learning_rate_schedule_warms_up_then_decays_to_zero():
    """``warmup_cosine`` by hand: 100 steps warm up over 5, then follow half a cosine."""
    from iterate.stages.reward_model import warmup_cosine

    assert warmup_cosine(0, 100) == pytest.approx(0.2)  # 1/5 of the way up, cos(0) = 1
    assert warmup_cosine(4, 100) == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 100)))
    assert warmup_cosine(50, 100) == pytest.approx(0.5)  # cos(pi/2) = 0
    assert warmup_cosine(100, 100) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine(150, 100) == pytest.approx(0.0, abs=1e-12)  # never below 0
    assert warmup_cosine(0, 10) == pytest.approx(1.0)  # too few steps to warm up: 1 step


def test_a_reward_model_step_whose_loss_is_not_finite_is_skipped_and_counted():
    """The reward model's loop ends each step as the update's do: a step whose loss is not
    finite takes no optimiser step (the weight stays) and is logged ``skipped``; the others
    clip and step, each with its gradient norm logged."""
    from iterate.config import RewardConfig
    from iterate.stages.reward_model import fit

    rc = RewardConfig()
    rc.batch_size, rc.grad_accum = 1, 1
    model = torch.nn.Linear(1, 1, bias=False)
    weights = []

    def objective(m, batch, pad_id):  # a pair (x, 0): loss (w x - 1)^2, NaN where x is 0
        (x, _), w = batch[0], m.weight[0, 0]
        weights.append(w.item())
        loss = (w * x - 1) ** 2 if x else w * float("nan")
        return loss.reshape(1), torch.ones(1)

    rows = fit(
        model, 0, [(1.0, 0), (0.0, 0), (2.0, 0)], rc, epochs=1, lr=0.1, seed=0, objective=objective
    )
    assert [r["skipped"] for r in rows].count(True) == 1 and len(rows) == 3
    at = [r["skipped"] for r in rows].index(True)
    assert weights[at + 1] == weights[at] if at < 2 else model.weight.item() == weights[at]
    assert all(math.isfinite(r["grad_norm"]) for r in rows if not r["skipped"])
    assert math.isfinite(model.weight.item())


def test_a_bf16_reward_model_trains_its_head_and_adapter_in_float32(tiny_world):
    """reward.dtype=bfloat16 with LoRA: the fresh scalar head and the adapter (what it
    trains) are float32, the frozen body bf16, and it scores under bf16 autocast."""
    from iterate.config import RewardConfig

    rc = RewardConfig()
    rc.dtype = "bfloat16"
    model, tok = reward_model._new_model(rc, str(tiny_world), seed=0)
    trained = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    ids = torch.tensor([tok("Hello Anna!")["input_ids"]])
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert out.logits.shape == (1, 1) and torch.isfinite(out.logits).all()


def test_a_reward_model_learns_from_labels_of_the_initial_policys_samples(
    tiny_cfg, tiny_world, tmp_path
):
    """reward.source=policy (the seeds' pipeline): the initial policy samples each prompt of
    reward.prompts reward.samples times, the label function scores them, and each prompt's
    best and worst make a pair (ties dropped and counted) that the Bradley-Terry model
    trains on; the samples stay in the stage folder, and a rerun redoes nothing."""
    from iterate.store.shards import read_shards
    from iterate.toy import world

    items = world.split(0.1)[0][:24]
    prompts = tmp_path / "rm_prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": it.prompt}) + "\n" for it in items))
    cfg = tiny_cfg
    cfg.generate.backend = "transformers"
    cfg.reward.source, cfg.reward.prompts = "policy", str(prompts)
    cfg.reward.label_function, cfg.reward.samples = "iterate.toy.world:gold_reward", 4
    cfg.reward.num_pairs, cfg.reward.heldout_fraction = 20, 0.25
    paths = _paths(cfg, tiny_world)
    done = reward_model.train(cfg, paths)
    samples = read_shards(paths.reward_model_samples)
    assert samples.num_rows == 20 * 4 and read_shards(paths.reward_model_prompts).num_rows == 20
    ties = done["dropped"].get("tie", 0)
    assert done["pairs"] == done["train_pairs"] + done["heldout_pairs"] == 20 - ties > 2
    by_prompt: dict = {}
    for p, r in zip(samples["prompt"].to_pylist(), samples["response"].to_pylist()):
        by_prompt.setdefault(p, []).append(world.gold_score(p, r))
    assert ties == sum(len(set(v)) == 1 for v in by_prompt.values())
    assert done["source"] == "policy" and 0 <= done["heldout_accuracy"] <= 1
    assert reward_model.train(cfg, paths)["finished_at"] == done["finished_at"]
