"""What every reward kind shares: the protocol a reward keeps (``Reward``), what a detailed
score says (``Scored``), the row a kind is in the table (``Kind``) and what making one takes
(``Build``). Torch-free: the loop and the start-up checks read it without loading a model."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from iterate.config import Config
from iterate.errors import BadInput


class Reward(Protocol):
    def identity(self) -> dict:
        """What the stages that score with this reward hash (JSON-able)."""

    def inputs(self) -> list[Path]:
        """Stage folders that made this reward: their identity is part of the scoring
        stage's."""

    def on(self, device) -> Reward:
        """This reward, to score on ``device`` (a copy when that differs)."""

    def score(
        self,
        prompts: list,
        responses: list[str],
        desc: str = "score",
        refusals: bool = False,
        detail: bool = False,
    ) -> Any:
        """One reward per pair. With ``refusals``, a pair the reward cannot score (a chat
        template that refuses the conversation) gets ``None`` instead of raising, for the
        caller to count and drop. With ``detail``, a ``Scored``: the rewards with what else
        the reward can say about them."""


class Scored(NamedTuple):
    """What ``score(..., detail=True)`` gives: one reward per pair (None: refused), an
    ensemble's disagreement per pair (None for a single model), a mixture's sources'
    rewards per pair by name ({} for a single source), and a generative judge's answers
    (``judge_model.Judgement``; [] for any other reward)."""

    rewards: list
    spreads: list
    parts: dict
    judgements: list


class Loaded:
    """A reward that loads what it scores with on first use (its ``_`` attributes): a copy
    sent to a scoring process carries none of it, and loads its own."""

    def __getstate__(self) -> dict:
        return {k: None if k.startswith("_") else v for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class Build:
    """What making a reward takes: the run's config (the scoring settings every model kind
    shares are ``reward``'s), the kind's own section (``settings``: ``reward`` itself, a
    mixture's source or an evaluation judge, each with ``kind``, ``function``, ``path``,
    ``pairwise_template`` and ``judge``) and where it is (``key``, what an error names), the
    model it loads (``path``), whether it is the run's own reward (``own``: its chat template
    and ensemble aggregate apply), the device it scores on and the run folder (where a
    function reads its prompts' row fields)."""

    cfg: Config
    settings: Any
    key: str = "reward"
    path: str = ""
    own: bool = True
    device: str = "cpu"
    run: Path | None = None

    def part(self, settings, key: str, own: bool) -> Build:
        """The build of a mixture's source or an evaluation judge (``settings``, at ``key``):
        the model at its own path, or the run's."""
        path = settings.path or self.path
        return dataclasses.replace(self, settings=settings, key=key, path=path, own=own)

    def scoring(self) -> dict:
        """The settings a model kind scores with (``ModelReward``'s)."""
        rc = self.cfg.reward
        out = {
            "dtype": str(rc.dtype),
            "max_length": rc.max_length,
            "batch_size": rc.score_batch_size,
            "device": self.device,
        }
        if self.own:
            out["chat_template"] = rc.chat_template
        return out


def never(settings) -> bool:
    return False


def always(settings) -> bool:
    return True


def no_comparison(settings) -> str | None:
    return None


@dataclass(frozen=True)
class Kind:
    """A reward kind, one row of the table (``iterate.rewards.kinds.KINDS``): everything the
    rest of the engine asks of a kind, so that none of it compares a kind's name.

    - ``make``: the reward, from a ``Build``;
    - ``check``: its settings' start-up checks (``check(cfg, settings, key)``: the run's
      reward, a mixture's source or an evaluation judge; ``BadInput`` naming the setting);
    - ``card``: the model card's line of the run's reward (``card(cfg, row)``);
    - ``owns_model``: whether the run has a model of its own with it, trained here before
      iteration 0 (``reward.train``: the ``reward_model`` stage) or loaded (``reward.path``);
      ``model_kind``: that model's kind (a mixture's is a Bradley–Terry model);
    - ``refreshable``: whether the refresh (``reward.refresh``: the ``reward`` stage of each
      iteration) can update that model: it fits Bradley–Terry models only;
    - ``folder``: what ``reward.path`` (or a judge's ``path``) must be, checked at start-up:
      ``reward model`` (a score head) or a causal LM's kind of model;
    - ``comparison``: the template a model answering "A" or "B" is trained on and asked with
      (None: it scores responses one by one);
    - ``whole_vocab``: trained to write its answer over the whole vocabulary (a judge), not
      as a choice between the answers' tokens;
    - ``source``: whether it can be a mixture's source (a score per response);
    - ``evaluator``: whether it can be an evaluation judge (``evaluate.judges``).
    """

    name: str
    make: Callable[[Build], Any]
    check: Callable[[Config, Any, str], None]
    card: Callable[[Config, dict], str]
    owns_model: Callable[[Any], bool] = never
    model_kind: str | None = None
    refreshable: bool = False
    folder: str | None = None
    comparison: Callable[[Any], str | None] = no_comparison
    whole_vocab: bool = False
    source: bool = False
    evaluator: bool = True


# the table of kinds, by name: filled by ``kinds`` with every kind's row
KINDS: dict[str, Kind] = {}


def kind(name: object, key: str = "reward.kind") -> Kind:
    """The row of a kind's name; ``BadInput`` naming the setting ``key`` and the kinds
    there are for any other."""
    row = KINDS.get(str(name))
    if row is None:
        raise BadInput(f"{key}={name!r}: not a reward kind (the kinds: {', '.join(KINDS)})")
    return row
