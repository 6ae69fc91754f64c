"""Reward-model training end to end on tiny models: toy pairs and an HH-format file."""

import json

import pytest
import torch

from iterate import reward_model
from iterate.paths import Paths
from iterate.shards import StageConfigChanged

from .conftest import ROOT


def _paths(cfg, world) -> Paths:
    from pathlib import Path

    return Paths(run=Path(cfg.runs_dir) / cfg.run_name, base_policy=str(world), toy=world)


def test_toy_reward_model_trains_records_and_skips(tiny_cfg, tiny_world):
    paths = _paths(tiny_cfg, tiny_world)
    done = reward_model.train(tiny_cfg, paths)
    rm_dir = paths.reward_model_dir
    assert (rm_dir / "_DONE.json").exists() and (rm_dir / "model" / "config.json").exists()
    for key in ("heldout_accuracy", "loss_curve", "train_pairs", "heldout_pairs", "parameters", "dropped", "config_hash"):
        assert key in done
    assert done["train_pairs"] + done["heldout_pairs"] == tiny_cfg.reward.num_pairs
    assert 0.0 <= done["heldout_accuracy"] <= 1.0
    assert done["trainable_parameters"] < done["parameters"], "LoRA trains a fraction"
    log = [json.loads(line) for line in (rm_dir / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == done["steps"] > 0

    # the merged model loads as a plain sequence classifier and scores with one label
    model, tok = reward_model.load_model(str(rm_dir / "model"))
    msgs = [{"role": "user", "content": "Greet Anna."}]
    seqs = [reward_model.encode(tok, msgs, r, 64) for r in ("Hello Anna!", "Ugh, Hello Rosa! Stop asking.")]
    scores = reward_model.score(model, tok, seqs)
    assert len(scores) == 2 and all(torch.isfinite(torch.tensor(scores)))

    # finished: a second call does nothing; a changed config is refused with the key named
    assert reward_model.train(tiny_cfg, paths)["finished_at"] == done["finished_at"]
    tiny_cfg.reward.lr = 0.5
    with pytest.raises(StageConfigChanged, match="reward.lr"):
        reward_model.train(tiny_cfg, paths)


def test_score_is_order_independent(tiny_world):
    model, tok = reward_model.load_model(str(tiny_world))
    msgs = [{"role": "user", "content": "Count from 1 to 3."}]
    seqs = [reward_model.encode(tok, msgs, r, 128) for r in ("1, 2, 3.", "Sure! " * 5 + "1, 2, 3.", "no")]
    batched = reward_model.score(model, tok, seqs, batch_size=3)
    single = [reward_model.score(model, tok, [s], batch_size=1)[0] for s in seqs]
    assert batched == pytest.approx(single, abs=1e-4), "padding and length-sorting do not change rewards"


def test_hh_reward_model_full_finetune_reports_dropped_rows(tiny_cfg, tiny_world):
    tiny_cfg.reward.source = "hh"
    tiny_cfg.reward.data_path = str(ROOT / "data" / "hh_fixture.jsonl")
    tiny_cfg.reward.lora.enabled = False
    tiny_cfg.reward.heldout_fraction = 0.25
    tiny_cfg.reward.batch_size = 4
    done = reward_model.train(tiny_cfg, _paths(tiny_cfg, tiny_world))
    assert done["dropped"] == {"no_assistant_turn": 1, "empty_response": 1, "identical_responses": 1}
    assert done["rows"] == 27 and done["train_pairs"] + done["heldout_pairs"] == 24
    assert done["heldout_pairs"] > 0
    assert done["trainable_parameters"] == done["parameters"], "full fine-tuning"


def test_encode_never_doubles_bos(tiny_world):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_world)
    ids = reward_model.encode(tok, [{"role": "user", "content": "Greet Anna."}], "Hello Anna!", 64)
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert ids[-1] == tok.eos_token_id
