"""``reward.kind=judge``: a generative judge, a causal LM prompted to compare two responses
or to score one, sampled through the run's sampler and its answer parsed
(``judge_model``); ``reward.judge`` says how it is asked. A comparing judge rewards by
tournament and has ``prefer``, like a pairwise model, and can be trained here like one."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from iterate import checks
from iterate.config import Config
from iterate.errors import BadInput
from iterate.rewards.base import Build, Kind, Scored, always
from iterate.rewards.model import ModelReward
from iterate.rewards.pairwise import compares_per_prompt


@dataclass
class JudgeReward(ModelReward):
    """A generative judge (``judge_model``): the causal LM at ``path`` sampled through the
    run's sampler (``how``: ``samplers.How``) and its answers parsed; ``settings``: the
    ``judge`` section. Compare mode rewards by tournament and has ``prefer``, like a
    pairwise model; score mode rewards each response by the number the judge gives it."""

    how: Any = None
    settings: Any = None  # config.JudgeConfig

    def judge(self):
        """The loaded ``judge_model.Judge``."""
        if self._scorer is None:
            import iterate.rewards.judge_model as jm

            js, mode = self.settings, str(self.settings.mode)
            self._scorer = jm.Judge(
                self.path,
                self.how,
                mode,
                jm.template(mode, js.template),
                jm.pattern(mode, js.pattern),
                js.max_tokens,
                js.temperature,
                js.retries,
                js.low,
                js.high,
                self.max_length,
                self.chat_template,
            )
        return self._scorer

    def identity(self) -> dict:
        j = self.judge()
        asked = {
            "mode": j.mode,
            "template": j.text,
            "pattern": j.rx.pattern,
            "max_tokens": j.max_tokens,
            "temperature": j.temperature,
            "retries": j.retries,
            "backend": self.how.backend,
        }
        if j.mode == "score":
            asked["range"] = [j.low, j.high]
        out = {k: v for k, v in super().identity().items() if k != "aggregate"}
        return out | {"judge": asked}

    @property
    def compares(self) -> bool:
        return str(self.settings.mode) == "compare"

    def on(self, device) -> JudgeReward:
        return self  # it samples on the run's engines, wherever it is asked from

    def score(self, prompts, responses, desc="score", refusals=False, detail=False):
        got, said = self.judge().score(prompts, responses, desc)
        return Scored(got, [None] * len(got), {}, said) if detail else got

    def prefer(self, prompts: list, a: list[str], b: list[str], desc: str = "prefer"):
        """P(a ≻ b) per row, both orders averaged (NaN: neither order judged); compare mode."""
        return self.judge().prefer(prompts, a, b, desc)[0]


def make(b: Build) -> JudgeReward:
    from iterate.sampling import samplers

    rc = b.cfg.reward
    spec = dataclasses.replace(
        samplers.Spec.of(b.cfg), dtype=str(rc.dtype), max_length=rc.max_length
    )
    return JudgeReward(
        b.path, **b.scoring(), how=samplers.How.of(b.cfg, spec), settings=b.settings.judge
    )


def check(cfg: Config, settings, key: str) -> None:
    """A generative judge: a template and a parser it can use, room for its answer, one
    model; a comparing judge only for the pair and group rules, a scoring one only loaded."""
    import iterate.rewards.judge_model as judge_model

    rc, js = cfg.reward, settings.judge
    mode, own = str(js.mode), settings is rc
    if own and mode == "compare":
        compares_per_prompt(
            cfg, "reward.judge.mode=compare", "a comparing judge", "reward.judge.mode=score"
        )
    if own and mode == "score" and rc.train:
        raise BadInput(
            "reward.kind=judge with reward.judge.mode=score: a scoring judge is "
            "not trained here; set reward.path to the judge model and "
            "reward.train=false"
        )
    if own:
        checks.need(
            rc.ensemble == 1,
            "reward.ensemble",
            rc.ensemble,
            "must be 1 for reward.kind=judge (one judge model)",
        )
    checks.need(
        rc.workers == 1,
        "reward.workers",
        rc.workers,
        "must be 1 with a judge: it samples on the run's engines (generate.workers)",
    )
    judge_model.template(mode, js.template)  # names what the template lacks
    judge_model.pattern(mode, js.pattern)  # names a parser that is no regular expression
    at = f"{key}.judge"
    checks.need(
        0 < js.max_tokens < rc.max_length // 2,
        f"{at}.max_tokens",
        js.max_tokens,
        f"must be above 0 and leave reward.max_length={rc.max_length} room for what "
        "the judge is shown (at most half of it)",
    )
    checks.need(js.retries >= 0, f"{at}.retries", js.retries, "must be 0 or more")
    checks.need(js.temperature >= 0, f"{at}.temperature", js.temperature, "must be 0 or more")
    checks.need(js.low < js.high, f"{at}.low", js.low, f"must be below {at}.high={js.high}")
    path = None if own and rc.train else settings.path
    if path:
        checks.causal_lm(f"{key}.path", path, "a judge is a causal LM that writes its answer")


def comparison(settings) -> str | None:
    import iterate.rewards.judge_model as judge_model

    js = settings.judge
    return judge_model.template("compare", js.template) if str(js.mode) == "compare" else None


def card(cfg: Config, row: dict) -> str:
    rc, js = cfg.reward, cfg.reward.judge
    line = (
        f"- **Reward:** {rc.name}, a generative judge ({js.mode} mode, {js.max_tokens} "
        f"tokens per answer at temperature {js.temperature:g}, {js.retries} retries)"
    )
    if (parsed := row.get("judge_parsed_first_try")) is not None:
        line += f"; {parsed:.1%} of its answers parsed at the first try"
    return line


KIND = Kind(
    "judge",
    make,
    check,
    card,
    owns_model=always,
    model_kind="judge",
    folder="judge model",
    comparison=comparison,
    whole_vocab=True,
)
