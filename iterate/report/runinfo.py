"""What a run folder holds, read from its files alone: the state of each stage (done,
partial with k of n shards or steps, missing), the metrics rows, and an iteration's
responses ranked by reward. The run inspector (``iterate.report.show``) prints it; the trackers'
sample tables read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from iterate.config import to_dataclass
from iterate.stages.plan import run_stages
from iterate.store import shards
from iterate.store.paths import STAGES, TRAIN_LOG, Paths, run_config
from iterate.store.shards import PLAN, read_json, read_jsonl, shard_paths
from iterate.store.stage import DONE

# the stages before iteration 0 a run can have (``Paths.before``: where they are)
BEFORE = ("reward_model", "heldout", "initial_samples")
# what a finished stage's _DONE.json counts, by the name the inspector prints
COUNTS = (
    ("rows_out", "rows"),
    ("train_pairs", "pairs"),
    ("judged_pairs", "judged pairs"),
    ("steps", "steps"),
)
# where a stage's shards are, inside its folder, when not at its top (Paths.evaluation_samples)
SHARD_FOLDER = {"evaluate": "samples"}


@dataclass
class StageState:
    name: str
    state: str  # done | partial | missing
    progress: tuple[int, int | None, str] | None = None  # (k, n or unknown, unit): partial only
    counts: dict[str, int] = field(default_factory=dict)  # what a finished stage made
    dropped: dict = field(default_factory=dict)
    seconds: float | None = None
    sources: dict = field(default_factory=dict)  # label: the reward's and its sources' stats
    judge: dict = field(default_factory=dict)  # label: how a generative judge's answers went

    def describe(self) -> str:
        if self.state == "partial" and self.progress:
            k, n, unit = self.progress
            return f"partial ({unit} {k} of {'?' if n is None else n})"
        return self.state


def stage_state(folder: Path, name: str, planned: int | None = None) -> StageState:
    """A stage folder's state; ``planned`` is the number of shards it will write when the
    folder does not say (label: one per generate shard)."""
    if (done := read_json(folder / DONE)) is not None:
        counts = {unit: done[k] for k, unit in COUNTS if done.get(k) is not None}
        dropped = done.get("dropped") or {}
        seconds, sources = done.get("seconds"), done.get("sources") or {}
        return StageState(
            name,
            "done",
            counts=counts,
            dropped=dropped,
            seconds=seconds,
            sources=sources,
            judge=done.get("judge") or {},
        )
    if not folder.exists():
        return StageState(name, "missing")
    plan = read_json(folder / SHARD_FOLDER.get(name, "") / PLAN) or {}
    unit = plan.get("unit", "steps" if name == "update" else "shards")
    if unit == "steps":
        k = len(read_jsonl(folder / TRAIN_LOG))
    else:
        k = len(shard_paths(folder / SHARD_FOLDER.get(name, "")))
    return StageState(name, "partial", progress=(k, plan.get("total", planned), unit))


def iterations(run: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in Path(run).glob("iter_[0-9]*") if p.is_dir())


def expected_stages(cfg: dict) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """The stages the loop runs for this config (``plan.run_stages``: before iteration 0,
    and in each iteration), or None for a config this version cannot read (an older one's
    settings): then the inspector lists the stages the run folder has."""
    try:
        typed = to_dataclass(OmegaConf.create(cfg))
    except Exception:  # (what fails is the config's, not the run's: the folders still say)
        return None
    return run_stages(typed)


def states(run: Path) -> dict[str, list[StageState]]:
    """``{"before": [...], "iter 0": [...], ...}``: every stage the run has or will have,
    for the iterations it has started, in the loop's order."""
    run = Path(run)
    paths = Paths(run=run, base_policy="")
    planned = expected_stages(run_config(run))
    if planned is None:  # the folders say which stages it has
        planned = [n for n in BEFORE if paths.before(n).exists()], ()
    before, expected = planned
    out = {"before": [stage_state(paths.before(name), name) for name in before]}
    for i in iterations(run):
        present = {p.name for p in paths.iteration(i).iterdir() if p.is_dir()}
        row = []
        for name in (s for s in STAGES if s in {*expected, *present}):
            planned = None
            if name == "label":  # one label shard per generate shard
                planned = read_json(paths.stage(i, "generate") / DONE, {}).get("shards")
            row.append(stage_state(paths.stage(i, name), name, planned))
        out[f"iter {i}"] = row
    return out


def scored_source(run: Path, i: int, heldout: bool = False) -> tuple[Path, Path, str] | None:
    """Where iteration i's scored responses are, without reading them: (samples folder,
    their scores' folder, which), the best-of-n samples and their labels, or with
    ``heldout`` (or for the rules without labels) the held-out samples the evaluation
    scored. ``None`` when neither is on disk yet."""
    paths = Paths(run=Path(run), base_policy="")
    pick = [(paths.evaluation_samples(i), paths.evaluation_scores(i), "held-out")]
    if not heldout:
        pick.insert(0, (paths.stage(i, "generate"), paths.stage(i, "label"), "best-of-n"))
    for gen, lab, which in pick:
        if shard_paths(gen) and shard_paths(lab):
            return gen, lab, which
    return None


def scored(run: Path, i: int, heldout: bool = False, keep: int | None = None):
    """Iteration i's responses with their reward (and gold), a pandas DataFrame from the
    shards ``scored_source`` names (``df.attrs["which"]`` says which); ``None`` when there
    are none yet. The samples are read shard by shard, never their token ids, and the
    scores (a few numbers a response) whole; with ``keep``, only the rows that can be among
    ``extremes(df, keep)`` are kept: each shard's ``keep`` best and worst, in their order."""
    if (source := scored_source(run, i, heldout)) is None:
        return None
    gen_dir, lab_dir, which = source
    keys = ["prompt_id", "sample_idx"]
    columns = [*keys, "prompt", "response", "response_tokens"]  # not the token ids
    labels = shards.read_shards(lab_dir).to_pandas()
    parts = []
    for path in shard_paths(gen_dir):
        df = shards.read_shard(path, columns).to_pandas().merge(labels, on=keys)
        if keep is not None:
            ranked = df[df["reward"].notna()].sort_values("reward", ascending=False, kind="stable")
            df = df.loc[sorted({*ranked.index[:keep], *ranked.index[-keep:]})] if keep else df[:0]
        parts.append(df)
    df = pd.concat(parts, ignore_index=True) if parts else None
    if df is not None:
        df.attrs["which"] = which  # best-of-n or held-out
    return df


def extremes(df, k: int) -> list[dict]:
    """The best and worst ``k`` responses of ``scored``'s table by reward, best first, as
    rows (rank, reward, gold where there is one, prompt, response)."""
    if df is not None:
        df = df[df["reward"].notna()]  # responses the reward model's template refused
    if df is None or not len(df) or k <= 0:
        return []
    df = df.sort_values("reward", ascending=False, kind="stable").reset_index(drop=True)
    top = df.head(k)
    top = top.assign(rank=[f"best {j + 1}" for j in range(len(top))])
    bottom = df.iloc[len(top) :].tail(k)  # the worst last, each response once
    bottom = bottom.assign(rank=[f"worst {len(bottom) - j}" for j in range(len(bottom))])
    cols = ["rank", "reward", *(["gold"] if df["gold"].notna().any() else []), "prompt", "response"]
    rows = [*top[cols].to_dict("records"), *bottom[cols].to_dict("records")]
    for r in rows:
        r["reward"] = round(float(r["reward"]), 4)
        if "gold" in r:
            r["gold"] = None if r["gold"] != r["gold"] else round(float(r["gold"]), 4)
    return rows
