"""``reward.kind=function``: a Python function of a batch, ``f(prompts, responses) ->
list[float]``, named ``package.module:function`` or ``path/to/file.py:function``; with
``prompts.fields`` it also gets the prompt rows' fields by name (a checker of each prompt's
constraints). Its identity is its name and the checksum of its source file's syntax tree:
editing the function redoes the stages that scored with it; reformatting it or editing its
comments does not."""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import inspect
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from numbers import Real
from pathlib import Path
from typing import Any

from iterate.config import Config
from iterate.errors import BadInput
from iterate.rewards.base import Build, Kind, Loaded, Scored


def load_function(spec: str, key: str = "reward.function") -> tuple[Callable, Path]:
    """The function ``spec`` names (``package.module:function`` or
    ``path/to/file.py:function``) and the file its source is in; ``BadInput`` naming the
    setting ``key`` that gave it and what is missing or what importing it raised."""
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise BadInput(
            f"{key}={spec!r}: expected package.module:function or path/to/file.py:function"
        )
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
        raise BadInput(f"{key}={spec!r}: importing {where} raised {type(e).__name__}: {e}") from e
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


def source_sum(path: Path) -> str:
    """SHA-256 of a Python source file's syntax tree (``ast.dump``: no comments, no layout,
    no line numbers), so that a formatter's pass keeps a function's identity and an edit of
    what it does changes it; of the file's bytes for a module that is not Python source."""
    data = path.read_bytes()
    if path.suffix == ".py":
        data = ast.dump(ast.parse(data, filename=str(path))).encode()
    return hashlib.sha256(data).hexdigest()


def _as_prompt(stored: str):
    """What a reward function gets for a prompt: its text, or for a conversation (a stored
    JSON list of messages with more than one turn) the list of messages."""
    from iterate.train.models import as_messages

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

    from iterate.store.paths import Paths
    from iterate.store.shards import FIELDS, shard_paths

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
class FunctionReward(Loaded):
    """A Python function of a batch, ``f(prompts, responses) -> list[float]``, called with
    ``batch_size`` rows at a time; with ``fields`` (``prompts.fields``) the function also
    gets, by name, each field it takes of the prompts' rows, one value per row (``None``
    for a prompt whose row has none: a synthetic one), read from the run folder ``run``'s
    prompt shards. Its identity names it (``function_name``), its source's checksum
    (``source_sum``) and the fields, so editing the function redoes the stages that used it.
    A row it scores ``None`` or NaN is dropped and counted; raising, returning the wrong
    number of values or a value that is not a number is ``BadInput`` naming the function,
    the row and the value.
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
            "source_tree_sha256": source_sum(self._source),
        }
        return out | ({"fields": list(self.fields)} if self.fields else {})

    def _kwargs(self, prompts: list) -> dict[str, list]:
        """The fields the function takes, of these prompts' rows."""
        named, _, any_name = takes(self._load())
        names = [n for n in self.fields if any_name or n in named]
        if not names:
            return {}
        from iterate.store.shards import prompt_id

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
                    got = fn(
                        batch,
                        list(responses[start : start + self.batch_size]),
                        **self._kwargs(stored),
                    )
            except progress.Overdue:
                raise BadInput(
                    f"{said} took longer than reward.function_timeout_s="
                    f"{self.timeout_s:g} on {rows} of {desc}: make it faster, "
                    "or raise the limit (0: none)"
                ) from None
            except Exception as e:
                raise BadInput(
                    f"{said} raised {type(e).__name__}: {e} (on {rows} of this batch)"
                ) from e
            got = list(got) if isinstance(got, (list, tuple)) or hasattr(got, "tolist") else got
            if not isinstance(got, list) or len(got) != len(batch):
                what = f"{len(got)} values" if isinstance(got, list) else f"a {type(got).__name__}"
                raise BadInput(
                    f"{said} returned {what} for {len(batch)} responses (one number "
                    "per response, in order)"
                )
            for k, v in enumerate(got):
                v = v.item() if hasattr(v, "item") else v
                if v is not None and (isinstance(v, bool) or not isinstance(v, Real)):
                    raise BadInput(
                        f"{said}: row {start + k} ({responses[start + k]!r}): {v!r} is not a number"
                    )
                out.append(float("nan") if v is None or math.isnan(v) else float(v))
            bar.update(len(batch))
        bar.close()
        return Scored(out, [None] * n, {}, []) if detail else out


def make(b: Build) -> FunctionReward:
    rc = b.cfg.reward
    return FunctionReward(
        b.settings.function,
        batch_size=rc.score_batch_size,
        fields=tuple(b.cfg.prompts.fields),
        run=str(b.run) if b.run else None,
        key=f"{b.key}.function",
        timeout_s=rc.function_timeout_s,
    )


def check_spec(cfg: Config, key: str, spec: str | None) -> None:
    """A reward function importable (its module loads and has the function), and every
    prompt-row field it needs named in ``prompts.fields``."""
    if not spec:
        raise BadInput(f"{key} is not set: package.module:function or path/to/file.py:function")
    fn, _ = load_function(spec, key)
    _, needed, _ = takes(fn)
    if missing := sorted(needed - set(cfg.prompts.fields)):
        raise BadInput(
            f"{key}={spec}: it takes {', '.join(map(repr, missing))}, not a setting but a "
            f"field of the prompt rows: name it in prompts.fields (prompts.fields="
            f"[{','.join(sorted(needed))}]; the prompts' source needs that column), or give "
            "the parameter a default"
        )


def check(cfg: Config, settings, key: str) -> None:
    check_spec(cfg, f"{key}.function", settings.function)


def card(cfg: Config, row: dict) -> str:
    return f"- **Reward:** {cfg.reward.name}, the function `{cfg.reward.function}`"


KIND = Kind("function", make, check, card, source=True)
