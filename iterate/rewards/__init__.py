"""Where rewards come from: one protocol (``Reward``), one table of kinds (``kinds.KINDS``)
and one factory (``of``).

A reward scores (prompt, response) pairs: ``score(prompts, responses)`` gives one float per
pair in the order given. A prompt is a stored prompt (text, or a JSON list of messages) or
a list of messages. ``identity()`` is what a stage that scores with the reward hashes, and
``inputs()`` the stage folders that made it (a reward model trained or refreshed in the
run), whose identity that stage records as well. A reward is cheap to make and to pickle:
a model loads on the first ``score``. ``pool.RewardPool`` deals many shards of scoring out
among processes, each holding its own copy.

The map of this package:

- ``base``: the protocol, ``Scored``, the ``Kind`` row and ``Build`` (what making one takes);
- one module per kind, with its reward class and its row: ``model`` (a Bradley–Terry reward
  model or an ensemble), ``function`` (a Python function, the toy world's gold judge and a
  checker of constraints among them), ``mixture`` (a weighted sum of sources), ``pairwise``
  (a pairwise preference model), ``judge`` (a generative judge);
- ``kinds``: the table of the kinds' rows;
- the machinery the model kinds load (torch): ``scorer`` (Bradley–Terry models and
  ensembles), ``pairwise_model`` (A-or-B models, their templates and loss), ``judge_model``
  (a generative judge's asking and parsing); and ``pool`` (scoring in several processes).

What a stage asks the factory for is a role: ``reward`` (what the loop optimises),
``model`` (the run's reward model alone), ``gold`` and ``correct`` (the toy world's gold
judge and answer check on its own prompts), ``judge`` (the reward-model refresh's judge),
``evaluator`` (one of ``evaluate.judges``, of any kind but a mixture).
"""

from __future__ import annotations

from pathlib import Path

from iterate.config import Config
from iterate.rewards.base import Build, Kind, Reward, Scored
from iterate.rewards.function import FunctionReward, function_name, load_function, takes
from iterate.rewards.judge import JudgeReward
from iterate.rewards.kinds import KINDS, kind
from iterate.rewards.mixture import MixtureReward, source_name
from iterate.rewards.model import ModelReward, weights_sum
from iterate.rewards.pairwise import PairwiseReward

# (no torch at import: the loop and validation read this package without loading it)

__all__ = [
    "Build",
    "FunctionReward",
    "JudgeReward",
    "KINDS",
    "Kind",
    "MixtureReward",
    "ModelReward",
    "PairwiseReward",
    "Reward",
    "Scored",
    "comparison",
    "function_name",
    "has_model",
    "kind",
    "load_function",
    "of",
    "refreshes",
    "source_name",
    "takes",
    "trains_model",
    "weights_sum",
]

GOLD = "iterate.toy.world:gold_reward"  # the toy world's gold judge as a reward function
CORRECT = "iterate.toy.world:correctness_reward"  # ... and its verifiable answer check


def has_model(cfg: Config) -> bool:
    """Whether the run has a reward model of its own (trained here or ``reward.path``; what
    the refresh updates)."""
    return kind(cfg.reward.kind).owns_model(cfg.reward)


def trains_model(cfg: Config) -> bool:
    """Whether the run trains its reward model before iteration 0 (``reward_model/``)."""
    return has_model(cfg) and cfg.reward.train


def refreshes(cfg: Config) -> bool:
    """Whether each iteration refreshes the reward model (``iter_i/reward/``): only a
    Bradley–Terry model of the run's own can be (``Kind.refreshable``), so
    ``reward.refresh`` (a tuning's default, say) does not apply to the others."""
    row = kind(cfg.reward.kind)
    return has_model(cfg) and row.refreshable and cfg.reward.refresh.pairs > 0


def comparison(cfg: Config) -> str | None:
    """The comparison template of a reward model that answers "A" or "B" (a pairwise model,
    a comparing judge): what it is trained on here and asked with; None for any other."""
    return kind(cfg.reward.kind).comparison(cfg.reward)


def model_row(cfg: Config) -> Kind:
    """The row of the run's own reward model (a mixture's is a Bradley–Terry model)."""
    return KINDS[kind(cfg.reward.kind).model_kind or "model"]


def of(
    cfg: Config,
    role: str = "reward",
    path: str = "",
    device=None,
    run: Path | None = None,
    part=None,
) -> Reward | None:
    """The run's reward for ``role`` in the run folder ``run`` (where a reward function
    reads its prompts' row fields):

    - ``reward``: the run's reward, of ``reward.kind`` (its model at ``path``: trained here,
      refreshed, or loaded): what labels, rolls out and is evaluated;
    - ``model``: the run's reward model at ``path`` alone (what the refresh ranks with);
    - ``gold``: the reference judge of the run's prompts, or ``None`` when they have none
      (the toy world's gold judge knows only toy prompts);
    - ``correct``: whether a response's answer is right (1 or 0), where the run's prompts
      have reference answers to check (the toy world's), else ``None``;
    - ``judge``: the reward-model refresh's judge (``reward.refresh.judge``: the gold judge
      or a judge model at ``judge_path``; a judge file is labels, not a reward: ``None``);
    - ``evaluator``: one of ``evaluate.judges`` (``part``), of its kind.
    """
    rc = cfg.reward
    build = Build(cfg, rc, "reward", path, True, str(device or "cpu"), run)
    if role == "reward":
        return kind(rc.kind).make(build)
    if role == "model":
        return model_row(cfg).make(build)
    if role in ("gold", "correct"):
        toy = str(cfg.prompts.source) == "toy"
        return FunctionReward(GOLD if role == "gold" else CORRECT) if toy else None
    if role == "evaluator":
        k = next(k for k, p in enumerate(cfg.evaluate.judges) if p is part)
        return kind(part.kind).make(build.part(part, f"evaluate.judges[{k}]", own=False))
    if role == "judge":
        judge = str(rc.refresh.judge)
        if judge == "gold":
            return FunctionReward(GOLD)
        if judge == "file":
            return None
        return ModelReward(rc.refresh.judge_path, **build.scoring() | {"chat_template": None})
    raise ValueError(f"unknown reward role {role!r}")
