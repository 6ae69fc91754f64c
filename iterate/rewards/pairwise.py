"""``reward.kind=pairwise``: a pairwise preference model, a causal LM that answers "A" or "B"
to a prompt and two responses (``pairwise_model``), trained here from preference pairs or
loaded; as a reward, each response's expected share of wins against the other responses to
its prompt (a tournament), and the held-out evaluation asks it directly (``prefer``)."""

from __future__ import annotations

from dataclasses import dataclass

from iterate import checks
from iterate.config import Config
from iterate.errors import BadInput
from iterate.rewards.base import Build, Kind, Scored, always
from iterate.rewards.model import ModelReward
from iterate.rewards.model import card as model_card
from iterate.train.rules import rule


@dataclass
class PairwiseReward(ModelReward):
    """A pairwise preference model: ``prefer(prompts, a, b)`` is P(a ≻ b), and as a reward
    each response gets its expected share of wins against the other responses to the same
    prompt in the call (a tournament: best-of-n pairs are picked by win counts).
    ``template``: what the model is shown (None: the shipped one)."""

    template: str | None = None
    compares = True  # the held-out evaluation asks it directly (``prefer``)

    def identity(self) -> dict:
        import iterate.rewards.pairwise_model as pairwise_model

        text = pairwise_model.template(self.template)
        return super().identity() | {"pairwise_template": text}

    def scorer(self):
        if self._scorer is None:
            import torch

            from iterate.rewards.pairwise_model import PairwiseScorer

            self._scorer = PairwiseScorer.load(
                self.path,
                self.dtype,
                self.max_length,
                self.batch_size,
                torch.device(self.device),
                self.template,
                self.chat_template,
            )
        return self._scorer

    def score(self, prompts, responses, desc="score", refusals=False, detail=False):
        got = self.scorer().score(prompts, responses, desc)
        return Scored(got, [None] * len(got), {}, []) if detail else got

    def prefer(self, prompts: list, a: list[str], b: list[str], desc: str = "prefer"):
        """P(a ≻ b) per row, both orders averaged."""
        return self.scorer().prefer(prompts, a, b, desc)


def make(b: Build) -> PairwiseReward:
    return PairwiseReward(b.path, **b.scoring(), template=b.settings.pairwise_template)


def compares_per_prompt(cfg: Config, setting: str, what: str, instead: str) -> None:
    """A reward that compares the responses to a prompt needs several of them: a pair or
    group rule's samples, not one rollout per prompt."""
    if rule(cfg.update.name).on_policy and not rule(cfg.update.name).groups:
        raise BadInput(
            f"{setting}: {what} compares responses to a prompt, and update={cfg.update.name} "
            "rolls out one per prompt; use a pair rule (dpo, raft), a group rule (grpo, rloo, "
            f"reinforce_pp) or {instead}"
        )


def check(cfg: Config, settings, key: str) -> None:
    """A pairwise model compares the responses to a prompt: for the pair rules' best-of-n
    samples, one model (not an ensemble), a template it can be shown, a causal LM."""
    import iterate.rewards.pairwise_model as pairwise_model

    rc = cfg.reward
    if settings is rc:
        compares_per_prompt(cfg, "reward.kind=pairwise", "a pairwise model", "a pointwise reward")
        checks.need(
            rc.ensemble == 1,
            "reward.ensemble",
            rc.ensemble,
            "must be 1 for reward.kind=pairwise (one pairwise model)",
        )
    pairwise_model.template(settings.pairwise_template)  # names what the template lacks
    path = settings.path if settings is not rc else (None if rc.train else rc.path)
    if path:
        checks.causal_lm(f"{key}.path", path, "a pairwise model is a causal LM that answers A or B")


def comparison(settings) -> str:
    import iterate.rewards.pairwise_model as pairwise_model

    return pairwise_model.template(settings.pairwise_template)


KIND = Kind(
    "pairwise",
    make,
    check,
    model_card,
    owns_model=always,
    model_kind="pairwise",
    folder="pairwise model",
    comparison=comparison,
)
