"""Where rewards come from: one protocol (``Reward``) and one factory (``of``).

A reward scores (prompt, response) pairs: ``score(prompts, responses)`` gives one float per
pair in the order given. A prompt is a stored prompt (text, or a JSON list of messages) or
a list of messages. ``identity()`` is what a stage that scores with the reward hashes, and
``inputs()`` the stage folders that made it (a reward model trained or refreshed in the
run), whose identity that stage records as well. A reward is cheap to make and to pickle:
a model loads on the first ``score``. ``reward_pool.RewardPool`` deals many shards of
scoring out among processes, each holding its own copy.

What a stage asks the factory for is a role: ``reward`` (what the loop optimises: the
reward model at a path, an ensemble folder included, or a Python function), ``gold`` (the
run's reference judge when it has one: the toy world's gold judge on its own prompts),
``judge`` (the judge of the reward-model refresh). Adding a reward source is one class
here and one line in ``of``; the stages that score do not change.

Sources: ``ModelReward`` (a Bradley–Terry reward model or an ensemble of them) and
``FunctionReward`` (a Python function; the toy world's gold judge is one,
``iterate.toy.world:gold_reward``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import inspect
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from numbers import Real
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from iterate.config import Config
from iterate.errors import BadInput
from iterate.stage import DONE
from iterate.stage import folder_sum as weights_sum  # a reward model's weights

# (no torch at import: the loop and validation read this module without loading it)


class Reward(Protocol):
    def identity(self) -> dict:
        """What the stages that score with this reward hash (JSON-able)."""

    def inputs(self) -> list[Path]:
        """Stage folders that made this reward: their identity is part of the scoring
        stage's."""

    def on(self, device) -> Reward:
        """This reward, to score on ``device`` (a copy when that differs)."""

    def score(
        self, prompts: list, responses: list[str], desc: str = "score", refusals: bool = False,
        detail: bool = False,
    ) -> Any:  # fmt: skip
        """One reward per pair. With ``refusals``, a pair the reward cannot score (a chat
        template that refuses the conversation) gets ``None`` instead of raising, for the
        caller to count and drop. With ``detail``, a ``Scored``: the rewards with what else
        the reward can say about them."""


class Scored(NamedTuple):
    """What ``score(..., detail=True)`` gives: one reward per pair (None: refused), an
    ensemble's disagreement per pair (None for a single model), a mixture's sources'
    rewards per pair by name ({} for a single source), and a generative judge's answers
    (``judge.Judgement``; [] for any other reward)."""

    rewards: list
    spreads: list
    parts: dict
    judgements: list


class _Loaded:
    """A reward that loads what it scores with on first use (its ``_`` attributes): a copy
    sent to a scoring process carries none of it, and loads its own."""

    def __getstate__(self) -> dict:
        return {k: None if k.startswith("_") else v for k, v in self.__dict__.items()}


@dataclass
class ModelReward(_Loaded):
    """A Bradley–Terry reward model, or an ensemble folder of them, scored through the one
    scorer (``scoring.Scorer``: each conversation in the reward model's own chat template,
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
        from iterate.scoring import ENSEMBLE

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
        """The loaded ``scoring.Scorer`` (loaded on first use)."""
        if self._scorer is None:
            import torch

            from iterate.scoring import Scorer

            self._scorer = Scorer.load(
                self.path, self.dtype, self.max_length, self.batch_size,
                torch.device(self.device), self.chat_template, self.aggregate,
                self.uncertainty_coef,
            )  # fmt: skip
        return self._scorer

    def score(self, prompts, responses, desc="score", refusals=False, detail=False):
        got = self.scorer().score(prompts, responses, desc, refusals, detail)
        return Scored(*got, {}, []) if detail else got


@dataclass
class PairwiseReward(ModelReward):
    """A pairwise preference model (``iterate.pairwise``): ``prefer(prompts, a, b)`` is
    P(a ≻ b), and as a reward each response gets its expected share of wins against the
    other responses to the same prompt in the call (a tournament: best-of-n pairs are
    picked by win counts). ``template``: what the model is shown (None: the shipped
    one)."""

    template: str | None = None
    compares = True  # the held-out evaluation asks it directly (``prefer``)

    def identity(self) -> dict:
        from iterate import pairwise

        text = pairwise.template(self.template)
        return super().identity() | {"pairwise_template": text}

    def scorer(self):
        if self._scorer is None:
            import torch

            from iterate.pairwise import PairwiseScorer

            self._scorer = PairwiseScorer.load(
                self.path, self.dtype, self.max_length, self.batch_size,
                torch.device(self.device), self.template, self.chat_template,
            )  # fmt: skip
        return self._scorer

    def score(self, prompts, responses, desc="score", refusals=False, detail=False):
        got = self.scorer().score(prompts, responses, desc)
        return Scored(got, [None] * len(got), {}, []) if detail else got

    def prefer(self, prompts: list, a: list[str], b: list[str], desc: str = "prefer"):
        """P(a ≻ b) per row, both orders averaged."""
        return self.scorer().prefer(prompts, a, b, desc)


@dataclass
class JudgeReward(ModelReward):
    """A generative judge (``iterate.judge``): the causal LM at ``path`` sampled through the
    run's sampler (``how``: ``sampling.How``) and its answers parsed; ``settings``: the
    ``reward.judge`` section. Compare mode rewards by tournament and has ``prefer``, like a
    pairwise model; score mode rewards each response by the number the judge gives it."""

    how: Any = None
    settings: Any = None  # config.JudgeConfig

    def judge(self):
        """The loaded ``judge.Judge``."""
        if self._scorer is None:
            from iterate import judge

            js, mode = self.settings, str(self.settings.mode)
            self._scorer = judge.Judge(
                self.path, self.how, mode, judge.template(mode, js.template),
                judge.pattern(mode, js.pattern), js.max_tokens, js.temperature, js.retries,
                js.low, js.high, self.max_length, self.chat_template,
            )  # fmt: skip
        return self._scorer

    def identity(self) -> dict:
        j = self.judge()
        asked = {"mode": j.mode, "template": j.text, "pattern": j.rx.pattern,
                 "max_tokens": j.max_tokens, "temperature": j.temperature, "retries": j.retries,
                 "backend": self.how.backend}  # fmt: skip
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


def load_function(spec: str, key: str = "reward.function") -> tuple[Callable, Path]:
    """The function ``spec`` names (``package.module:function`` or
    ``path/to/file.py:function``) and the file its source is in; ``BadInput`` naming the
    setting ``key`` that gave it and what is missing or what importing it raised."""
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise BadInput(f"{key}={spec!r}: expected package.module:function or "
                       "path/to/file.py:function")  # fmt: skip
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise BadInput(f"{key}={spec!r}: no such file: {path}")
            # one module per file and content: loaded once a process, an edit loads anew
            digest = hashlib.sha256(str(path.resolve()).encode() + path.read_bytes()).hexdigest()
            module = sys.modules.get(f"iterate_reward_{digest[:16]}")
            if module is None:
                found = importlib.util.spec_from_file_location(
                    f"iterate_reward_{digest[:16]}", path
                )
                module = importlib.util.module_from_spec(found)
                found.loader.exec_module(module)
                sys.modules[found.name] = module
        else:
            module = importlib.import_module(where)
    except BadInput:
        raise
    except ModuleNotFoundError as e:
        raise BadInput(f"{key}={spec!r}: no module named {e.name!r}") from None
    except Exception as e:  # the user's module failed to import: say so, name it
        raise BadInput(f"{key}={spec!r}: importing {where} raised "
                       f"{type(e).__name__}: {e}") from e  # fmt: skip
    fn = getattr(module, name, None)
    if not callable(fn):
        raise BadInput(f"{key}={spec!r}: {where} has no function {name!r}")
    return fn, Path(inspect.getsourcefile(fn) or module.__file__)


def function_name(spec: str) -> str:
    """A function's name in an identity: ``package.module:function`` as given, or for a file
    its name and the function (``rf.py:f``) however its path was typed (relative, ``./``,
    absolute, from another folder): the file's checksum stands beside it."""
    where, _, name = spec.rpartition(":")
    return f"{Path(where).name}:{name}" if where.endswith(".py") else spec


def _as_prompt(stored: str):
    """What a reward function gets for a prompt: its text, or for a conversation (a stored
    JSON list of messages with more than one turn) the list of messages."""
    from iterate.models import as_messages

    messages = as_messages(stored) if isinstance(stored, str) else stored
    return messages[0]["content"] if len(messages) == 1 else messages


def takes(fn: Callable) -> tuple[set[str], set[str], bool]:
    """(the names a reward function takes after prompts and responses, those of them it
    needs (no default), whether it takes ``**kwargs``)."""
    params = list(inspect.signature(fn).parameters.values())[2:]
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    needed = {p.name for p in params if p.name in named and p.default is p.empty}
    return named, needed, any(p.kind == p.VAR_KEYWORD for p in params)


def row_fields(run: Path) -> dict[str, dict]:
    """prompt id -> the fields of its prompt row (``prompts.fields``), for every prompt the
    run holds: held out, drawn by each iteration so far, and sampled for the reward model
    (``reward.source=policy``)."""
    import pyarrow.parquet as pq

    from iterate.paths import Paths
    from iterate.shards import FIELDS, shard_paths

    paths, out = Paths(run=Path(run), base_policy=""), {}
    drawn = sorted(Path(run).glob("iter_*/prompts"))
    for folder in [paths.heldout_dir, paths.reward_model_prompts, *drawn]:
        for shard in shard_paths(folder):
            t = pq.read_table(shard)
            if FIELDS in t.column_names:
                ids, said = t["prompt_id"].to_pylist(), t[FIELDS].to_pylist()
                out.update(zip(ids, map(json.loads, said)))
    return out


@dataclass
class FunctionReward(_Loaded):
    """A Python function of a batch, ``f(prompts, responses) -> list[float]``, called with
    ``batch_size`` rows at a time; with ``fields`` (``prompts.fields``) the function also
    gets, by name, each field it takes of the prompts' rows, one value per row (``None``
    for a prompt whose row has none: a synthetic one), read from the run folder ``run``'s
    prompt shards. Its identity names it (``function_name``), its source file's checksum and
    the fields, so editing the function redoes the stages that used it. A row it scores
    ``None`` or NaN is dropped and counted; raising, returning the wrong number of values or
    a value that is not a number is ``BadInput`` naming the function, the row and the value.
    A call says it is still running every 30 s, and one past ``timeout_s`` stops the run
    naming it."""

    spec: str
    batch_size: int = 64
    fields: tuple[str, ...] = ()
    run: str | None = None
    key: str = "reward.function"  # the setting that names it (what an error names)
    timeout_s: float = 600.0  # one batch's call (reward.function_timeout_s); 0: no limit
    _fn: Any = field(default=None, repr=False, compare=False)
    _source: Any = field(default=None, repr=False, compare=False)  # the function's file
    _rows: Any = field(default=None, repr=False, compare=False)  # prompt id -> fields
    _absent: Any = field(default_factory=set, repr=False, compare=False)  # ids without a row

    def _load(self) -> Callable:
        if self._fn is None:
            self._fn, self._source = load_function(self.spec, self.key)
        return self._fn

    def identity(self) -> dict:
        self._load()
        out = {
            "reward_function": function_name(self.spec),
            "source_sha256": hashlib.sha256(self._source.read_bytes()).hexdigest(),
        }
        return out | ({"fields": list(self.fields)} if self.fields else {})

    def _kwargs(self, prompts: list) -> dict[str, list]:
        """The fields the function takes, of these prompts' rows."""
        named, _, any_name = takes(self._load())
        names = [n for n in self.fields if any_name or n in named]
        if not names:
            return {}
        from iterate.shards import prompt_id

        ids = [prompt_id(p) if isinstance(p, str) else None for p in prompts]
        new = set(ids) - {None} - (self._rows or {}).keys() - self._absent
        if self._rows is None or new:  # a new iteration's prompts: read the run's rows again
            self._rows = row_fields(Path(self.run)) if self.run else {}
            self._absent |= new - self._rows.keys()  # not in the run: not read again for them
        rows = [self._rows.get(i) or {} for i in ids]
        return {n: [r.get(n) for r in rows] for n in names}

    def inputs(self) -> list[Path]:
        return []

    def on(self, device) -> FunctionReward:
        return self

    def score(self, prompts, responses, desc="score", refusals=False, detail=False):
        from iterate import progress

        fn, n = self._load(), len(responses)
        if len(prompts) != n:
            raise ValueError(f"{len(prompts)} prompts for {n} responses")
        out: list[float] = []
        said = f"{self.key}={self.spec}"
        bar = progress.bar(n, desc, "row")
        for start in range(0, n, self.batch_size):
            stored = prompts[start : start + self.batch_size]
            batch = [_as_prompt(p) for p in stored]
            rows = f"rows {start}..{start + len(batch) - 1}"
            try:
                with progress.watch(f"{said} on {rows} of {desc}", self.timeout_s):
                    got = fn(batch, list(responses[start : start + self.batch_size]),
                             **self._kwargs(stored))  # fmt: skip
            except progress.Overdue:
                raise BadInput(f"{said} took longer than reward.function_timeout_s="
                               f"{self.timeout_s:g} on {rows} of {desc}: make it faster, "
                               "or raise the limit (0: none)") from None  # fmt: skip
            except Exception as e:
                raise BadInput(f"{said} raised {type(e).__name__}: {e} (on {rows} of this "
                               "batch)") from e  # fmt: skip
            got = list(got) if isinstance(got, (list, tuple)) or hasattr(got, "tolist") else got
            if not isinstance(got, list) or len(got) != len(batch):
                what = f"{len(got)} values" if isinstance(got, list) else f"a {type(got).__name__}"
                raise BadInput(f"{said} returned {what} for {len(batch)} responses (one number "
                               "per response, in order)")  # fmt: skip
            for k, v in enumerate(got):
                v = v.item() if hasattr(v, "item") else v
                if v is not None and (isinstance(v, bool) or not isinstance(v, Real)):
                    raise BadInput(f"{said}: row {start + k} ({responses[start + k]!r}): "
                                   f"{v!r} is not a number")  # fmt: skip
                out.append(float("nan") if v is None or math.isnan(v) else float(v))
            bar.update(len(batch))
        bar.close()
        return Scored(out, [None] * n, {}, []) if detail else out


@dataclass
class MixtureReward:
    """A weighted sum of sources (``reward.kind=mixture``): each source scores every pair,
    and the reward is ``sum(weight * reward)``; a pair any source cannot score (``None``,
    NaN) is dropped. With ``detail`` each source's rewards come by name (the label stage
    keeps them in columns ``source_<name>``), and the spread is the model source's."""

    parts: list[tuple[str, Any, float]]  # (name, reward, weight)

    def identity(self) -> dict:
        return {"mixture": [{"name": n, "weight": w, **r.identity()} for n, r, w in self.parts]}

    @property
    def device(self) -> str:  # where its model sources score (RewardPool places them by it)
        return next((r.device for _, r, _ in self.parts if hasattr(r, "device")), "cpu")

    def inputs(self) -> list[Path]:
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
    """A mixture source's name: its own, or its function's, or "model"."""
    if part.name:
        return str(part.name)
    return str(part.function).rpartition(":")[2] if str(part.kind) == "function" else "model"


GOLD = "iterate.toy.world:gold_reward"  # the toy world's gold judge as a reward function
CORRECT = "iterate.toy.world:correctness_reward"  # ... and its verifiable answer check


def has_model(cfg: Config) -> bool:
    """Whether the run has a reward model of its own (trained here or ``reward.path``; what
    the refresh updates): its reward is one, or a mixture has a model source without a
    path of its own."""
    rc = cfg.reward
    if str(rc.kind) == "mixture":
        return any(str(p.kind) == "model" and not p.path for p in rc.sources)
    return str(rc.kind) in ("model", "pairwise", "judge")


def trains_model(cfg: Config) -> bool:
    """Whether the run trains its reward model before iteration 0 (``reward_model/``)."""
    return has_model(cfg) and cfg.reward.train


def refreshes(cfg: Config) -> bool:
    """Whether each iteration refreshes the reward model (``iter_i/reward/``): a reward
    function has none to refresh, and the refresh fits Bradley–Terry models, not pairwise
    models or judges, so ``reward.refresh`` (a tuning's default, say) does not apply to
    them."""
    kind = str(cfg.reward.kind)
    return has_model(cfg) and kind not in ("pairwise", "judge") and cfg.reward.refresh.pairs > 0


def comparison(cfg: Config) -> str | None:
    """The comparison template of a reward model that answers "A" or "B" (a pairwise model,
    a comparing judge): what it is trained on here and asked with; None for any other."""
    rc = cfg.reward
    if str(rc.kind) == "pairwise":
        from iterate import pairwise

        return pairwise.template(rc.pairwise_template)
    if str(rc.kind) == "judge" and str(rc.judge.mode) == "compare":
        from iterate import judge

        return judge.template("compare", rc.judge.template)
    return None


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

    - ``reward``: the reward model at ``path`` (trained here, refreshed, or loaded) with the
      settings of ``cfg.reward``, a function, or a mixture of them: what labels, rolls out
      and is evaluated;
    - ``model``: the run's reward model at ``path`` alone (what the refresh ranks with);
    - ``gold``: the reference judge of the run's prompts, or ``None`` when they have none
      (the toy world's gold judge knows only toy prompts);
    - ``correct``: whether a response's answer is right (1 or 0), where the run's prompts
      have reference answers to check (the toy world's), else ``None``;
    - ``judge``: the reward-model refresh's judge (``reward.refresh.judge``: the gold judge
      or a judge model at ``judge_path``; a judge file is labels, not a reward: ``None``);
    - ``evaluator``: one of ``evaluate.judges`` (``part``): a function, a reward model or a
      pairwise model at its path.
    """
    rc, dev = cfg.reward, str(device or "cpu")

    def model(path, cls=ModelReward, **kw) -> ModelReward:
        return cls(path, dtype=str(rc.dtype), max_length=rc.max_length,
                   batch_size=rc.score_batch_size, device=dev, **kw)  # fmt: skip

    function = partial(
        FunctionReward, batch_size=rc.score_batch_size, fields=tuple(cfg.prompts.fields),
        run=str(run) if run else None, timeout_s=rc.function_timeout_s,
    )  # fmt: skip
    own = partial(
        model, chat_template=rc.chat_template, aggregate=str(rc.aggregate),
        uncertainty_coef=rc.uncertainty_coef,
    )  # fmt: skip
    if role == "reward" and str(rc.kind) == "mixture":
        return MixtureReward([
            (source_name(p), function(p.function, key=f"reward.sources[{k}].function")
             if str(p.kind) == "function" else own(p.path or path), p.weight)
            for k, p in enumerate(rc.sources)
        ])  # fmt: skip
    if role == "reward" and str(rc.kind) == "function":
        return function(rc.function)
    if role in ("reward", "model") and str(rc.kind) == "judge":
        from iterate import sampling

        spec = sampling.Spec.of(cfg)
        spec = dataclasses.replace(spec, dtype=str(rc.dtype), max_length=rc.max_length)
        return model(path, chat_template=rc.chat_template, cls=JudgeReward,
                     how=sampling.How.of(cfg, spec), settings=rc.judge)  # fmt: skip
    if role in ("reward", "model") and str(rc.kind) == "pairwise":
        return model(path, chat_template=rc.chat_template, cls=PairwiseReward,
                     template=rc.pairwise_template)  # fmt: skip
    if role in ("reward", "model"):
        return own(path)
    if role in ("gold", "correct"):
        toy = str(cfg.prompts.source) == "toy"
        return FunctionReward(GOLD if role == "gold" else CORRECT) if toy else None
    if role == "evaluator":
        if str(part.kind) == "function":
            k = next(k for k, p in enumerate(cfg.evaluate.judges) if p is part)
            return function(part.function, key=f"evaluate.judges[{k}].function")
        return model(part.path, cls=PairwiseReward if str(part.kind) == "pairwise" else ModelReward)
    if role == "judge":
        judge = str(rc.refresh.judge)
        if judge == "gold":
            return FunctionReward(GOLD)
        return None if judge == "file" else model(rc.refresh.judge_path)
    raise ValueError(f"unknown reward role {role!r}")
