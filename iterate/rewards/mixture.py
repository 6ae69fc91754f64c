"""``reward.kind=mixture``: a weighted sum of sources (``reward.sources``), each a kind that
scores responses one by one (a reward model, the run's own or one at a path, or a
function); each source's rewards are kept in a column of their own."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from iterate import checks
from iterate.config import Config
from iterate.rewards.base import KINDS, Build, Kind, Scored, kind


@dataclass
class MixtureReward:
    """A weighted sum of sources: each source scores every pair, and the reward is
    ``sum(weight * reward)``; a pair any source cannot score (``None``, NaN) is dropped.
    With ``detail`` each source's rewards come by name (the label stage keeps them in
    columns ``source_<name>``), and the spread is the model source's."""

    parts: list[tuple[str, Any, float]]  # (name, reward, weight)

    def identity(self) -> dict:
        return {"mixture": [{"name": n, "weight": w, **r.identity()} for n, r, w in self.parts]}

    @property
    def device(self) -> str:  # where its model sources score (RewardPool places them by it)
        return next((r.device for _, r, _ in self.parts if hasattr(r, "device")), "cpu")

    def inputs(self) -> list:
        return [p for _, r, _ in self.parts for p in r.inputs()]

    def on(self, device) -> MixtureReward:
        return MixtureReward([(n, r.on(device), w) for n, r, w in self.parts])

    def score(self, prompts, responses, desc="score", refusals=False, detail=False):
        parts, spreads = {}, [None] * len(responses)
        for name, reward, _ in self.parts:
            got, spread, *_ = reward.score(prompts, responses, f"{desc} ({name})", refusals, True)
            parts[name] = got
            spreads = spread if any(x is not None for x in spread) else spreads
        total = []
        for k in range(len(responses)):
            each = [(parts[n][k], w) for n, _, w in self.parts]
            if any(v is None for v, _ in each):
                total.append(None)  # refused by a source's template: counted and dropped
            else:
                total.append(sum(w * v for v, w in each))  # NaN stays NaN: dropped
        return Scored(total, spreads, parts, []) if detail else total


def source_name(part) -> str:
    """A source's (or an evaluation judge's) name: its own, or its function's, or its
    kind's ("model" for a reward model)."""
    if part.name:
        return str(part.name)
    return str(part.function).rpartition(":")[2] if part.function else str(part.kind)


def make(b: Build) -> MixtureReward:
    parts = enumerate(b.settings.sources)  # each scored as the run's own reward would be
    made = [(p, kind(p.kind).make(b.part(p, f"{b.key}.sources[{k}]", own=True))) for k, p in parts]
    return MixtureReward([(source_name(p), r, p.weight) for p, r in made])


def owns_model(settings) -> bool:
    """A source that is the run's own model (no path of its own)."""
    return any(kind(p.kind).owns_model(p) and not p.path for p in settings.sources)


def check(cfg: Config, settings, key: str) -> None:
    """Each source: a kind that scores responses one by one, named once; a weight not 0."""
    sources = settings.sources
    checks.need(
        bool(sources),
        f"{key}.sources",
        [],
        "reward.kind=mixture needs sources: "
        "[{kind: model, weight: 1}, {kind: function, function: ..., weight: -0.01}]",
    )
    names = [source_name(p) for p in sources]
    can = [k.name for k in KINDS.values() if k.source]
    for k, (part, name) in enumerate(zip(sources, names, strict=True)):
        at = f"{key}.sources[{k}]"
        checks.need(
            str(part.kind) in can, f"{at}.kind", str(part.kind), f"must be {' or '.join(can)}"
        )
        checks.need(
            re.fullmatch(r"\w+", name) is not None and names.count(name) == 1 and name != "reward",
            f"{at}.name",
            name,
            "must be a word (letters, digits, "
            "_) that no other source has, not 'reward' (the sum's): it names the "
            "source's column, source_<name>",
        )
        kind(part.kind).check(cfg, part, at)
    weights = [p.weight for p in sources]
    checks.need(
        any(weights),
        f"{key}.sources[*].weight",
        weights,
        "at least one must not be 0 "
        "(every weight 0: a reward of 0 for every response, nothing to learn from)",
    )


def card(cfg: Config, row: dict) -> str:
    means = row.get("source_means") or {}
    parts = [
        f"{p.weight:g} x {source_name(p)}"
        + (f" (`{p.function}`)" if p.function else "")
        + (f", mean {means[source_name(p)]:+.4f}" if source_name(p) in means else "")
        for p in cfg.reward.sources
    ]
    return f"- **Reward:** {cfg.reward.name}, the sum of " + "; ".join(parts)


KIND = Kind(
    "mixture",
    make,
    check,
    card,
    owns_model=owns_model,
    model_kind="model",
    refreshable=True,
    evaluator=False,
)
