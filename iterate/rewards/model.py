"""``reward.kind=model``: a Bradley–Terry reward model (a sequence-classification checkpoint
with a scalar head), or an ensemble folder of them, trained here before iteration 0 or
loaded from ``reward.path``; scored through the one scorer (``scorer.Scorer``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from iterate import checks
from iterate.config import Config
from iterate.rewards.base import Build, Kind, Loaded, Scored, always
from iterate.store.stage import DONE
from iterate.store.stage import folder_sum as weights_sum  # a reward model's weights


@dataclass
class ModelReward(Loaded):
    """A Bradley–Terry reward model, or an ensemble folder of them, scored through the one
    scorer (``scorer.Scorer``: each conversation in the reward model's own chat template,
    length-sorted batches)."""

    path: str
    dtype: str = "float32"
    max_length: int = 1024
    batch_size: int = 64
    chat_template: str | None = None
    aggregate: str = "mean"  # how an ensemble's members' rewards make one
    uncertainty_coef: float = 1.0
    device: str = "cpu"
    _scorer: Any = field(default=None, repr=False, compare=False)

    def identity(self) -> dict:
        from iterate.rewards.scorer import ENSEMBLE

        out = {
            "reward_model": self.path,
            "max_length": self.max_length,
            "dtype": self.dtype,
            "chat_template": self.chat_template,
        }
        if (Path(self.path) / ENSEMBLE).exists():
            out["aggregate"] = [self.aggregate, self.uncertainty_coef]
        if not self.inputs() and Path(self.path).is_dir():  # a folder from outside the run:
            out["reward_weights"] = weights_sum(Path(self.path))  # its weights, not its name
        return out

    def inputs(self) -> list[Path]:
        made_by = Path(self.path).parent  # the stage that trained or refreshed it, if any
        return [made_by] if (made_by / DONE).exists() else []

    def on(self, device) -> ModelReward:
        if str(device) == self.device:
            return self
        return dataclasses.replace(self, device=str(device), _scorer=None)

    def scorer(self):
        """The loaded ``scorer.Scorer`` (loaded on first use)."""
        if self._scorer is None:
            import torch

            from iterate.rewards.scorer import Scorer

            self._scorer = Scorer.load(
                self.path,
                self.dtype,
                self.max_length,
                self.batch_size,
                torch.device(self.device),
                self.chat_template,
                self.aggregate,
                self.uncertainty_coef,
            )
        return self._scorer

    def score(self, prompts, responses, desc="score", refusals=False, detail=False):
        got = self.scorer().score(prompts, responses, desc, refusals, detail)
        return Scored(*got, {}, []) if detail else got


def make(b: Build) -> ModelReward:
    rc = b.cfg.reward
    ensemble = {"aggregate": str(rc.aggregate), "uncertainty_coef": rc.uncertainty_coef}
    return ModelReward(b.path, **b.scoring(), **(ensemble if b.own else {}))


def check(cfg: Config, settings, key: str) -> None:
    """A reward model named by a source or a judge: a folder with a score head."""
    if settings is not cfg.reward and settings.path:
        checks.reward_folder(f"{key}.path", settings.path)


def card(cfg: Config, row: dict) -> str:
    return f"- **Reward model:** {cfg.reward.name}"


KIND = Kind(
    "model",
    make,
    check,
    card,
    owns_model=always,
    model_kind="model",
    refreshable=True,
    folder="reward model",
    source=True,
)
