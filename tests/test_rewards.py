"""The reward seam (``iterate.rewards``): what each role gives, what a stage hashes of a
reward, what travels to a scoring process. No model is loaded here."""

from __future__ import annotations

import json
import pickle

import pytest

from iterate import rewards
from iterate.stage import DONE
from iterate.toy import world

from .conftest import compose_cfg


def test_the_reward_models_identity_is_what_the_label_stage_always_hashed(tmp_path):
    cfg = compose_cfg(["reward.max_length=77", "reward.chat_template=zephyr"])
    one = tmp_path / "rm"
    one.mkdir()
    got = rewards.of(cfg, path=str(one)).identity()
    assert got == {
        "reward_model": str(one), "max_length": 77, "dtype": str(cfg.reward.dtype),
        "chat_template": "zephyr",
    }  # fmt: skip
    # an ensemble folder: how its members' rewards are combined counts too
    (one / "ensemble.json").write_text(json.dumps({"members": [], "offsets": []}))
    cfg.reward.aggregate, cfg.reward.uncertainty_coef = "mean_minus_std", 0.5
    assert rewards.of(cfg, path=str(one)).identity()["aggregate"] == ["mean_minus_std", 0.5]


def test_a_reward_names_the_stage_that_made_it_only_when_that_stage_finished(tmp_path):
    cfg = compose_cfg([])
    stage = tmp_path / "iter_000" / "reward"
    (stage / "model").mkdir(parents=True)
    reward = rewards.of(cfg, path=str(stage / "model"))
    assert reward.inputs() == []  # a loaded reward model, or a stage still running
    (stage / DONE).write_text("{}")
    assert reward.inputs() == [stage]


def test_the_gold_judge_is_the_toy_worlds_and_only_for_its_prompts():
    gold = rewards.of(compose_cfg([]), "gold")
    prompts, responses = ["Greet Anna.", "Greet Anna."], ["Hello Anna!", "Ugh. Hello Rosa."]
    assert gold.score(prompts, responses) == [world.gold_score(p, r) for p, r in
                                             zip(prompts, responses)]  # fmt: skip
    assert gold.score(prompts, responses)[0] > gold.score(prompts, responses)[1]
    scores, spread = gold.score(prompts, responses, spread=True)
    assert spread == [None, None] and gold.identity() == {"judge": "gold"}
    assert gold.inputs() == [] and gold.on("cuda") is gold
    assert rewards.of(compose_cfg(["prompts=file", "prompts.path=x.jsonl"]), "gold") is None
    with pytest.raises(ValueError, match="shorter"):  # never a silent truncation
        gold.score(prompts, responses[:1])


@pytest.mark.parametrize(
    "overrides, kind",
    [
        ([], rewards.GoldJudge),
        (["reward.refresh.judge=model", "reward.refresh.judge_path=judge"], rewards.ModelReward),
        (["reward.refresh.judge=file", "reward.refresh.path=p.jsonl"], type(None)),
    ],
)
def test_the_refresh_judge_is_the_configured_one(overrides, kind):
    judge = rewards.of(compose_cfg(overrides), "judge")
    assert isinstance(judge, kind)
    if kind is rewards.ModelReward:  # scored like a reward model: no template, no ensemble
        assert judge.path == "judge" and judge.chat_template is None
        assert judge.aggregate == "mean"


def test_a_reward_travels_to_a_scoring_process_without_its_loaded_model(tmp_path):
    reward = rewards.of(compose_cfg([]), path=str(tmp_path))
    reward._scorer = object()  # what a first score call leaves: never pickled
    copy = pickle.loads(pickle.dumps(reward))
    assert copy._scorer is None and copy.identity() == reward.identity()
    assert reward._scorer is not None, "the original keeps its model"
    moved = reward.on("cuda:1")
    assert moved.device == "cuda:1" and moved._scorer is None and reward.device == "cpu"
    assert reward.on("cpu") is reward


def test_an_unknown_role_is_an_error():
    with pytest.raises(ValueError, match="role"):
        rewards.of(compose_cfg([]), "oracle")
