"""Experiment trackers: ``report_to=[tensorboard,wandb,trackio]`` (none by default).

What they get:

- per optimiser step, ``train/<key>`` for every key of the step's ``train_log.jsonl`` line
  (loss, grad norm, learning rate and the rule's own: DPO reward margins and accuracies,
  PPO and ReMax KL, entropy, clip fraction, ...), against the run's optimiser step counted
  over all iterations (iteration i's steps follow those of the iterations before it);
- per iteration, ``iteration/<key>`` for every ``metrics.jsonl`` key (the KL gate's
  decision as ``iteration/accepted``, 1 or 0), against the iteration, and a table of the
  best and worst held-out responses by reward, with the gold score where there is one.

A tracker session is opened for one burst of logging (an update's training loop, an
iteration's row) by whichever process does the work, and closed after it, so the run's own
process and a launched training process log to the same tracker run in turn. The run
folder keeps the tracker run's identity and what each tracker logged (``tracker.json``): a
resumed run continues the same tracker run, and a step already logged is not logged again,
whether the training loop logged it live or the iteration's end caught it up from
``train_log.jsonl`` (a run that gains ``report_to`` later is caught up whole).
"""

from __future__ import annotations

import copy
import logging
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from iterate.config import Config, plain
from iterate.store.paths import TRAIN_LOG, Paths
from iterate.store.shards import atomic_write_json, read_json, read_jsonl
from iterate.store.stage import DONE, flatten

log = logging.getLogger(__name__)

STATE = "tracker.json"


def flat(row: dict) -> dict[str, float]:
    """The numbers of a row, nested keys joined by ``/`` (``seconds/update``); booleans as
    1 or 0; strings and missing values left out."""
    return {k: float(v) for k, v in flatten(row, sep="/").items() if isinstance(v, int | float)}


class _TensorBoard:
    one_axis = False  # each tag its own steps: an iteration's row at the iteration
    flushes = True  # flush() puts what was logged on disk

    def __init__(self, run: Path, ident: str, config: dict) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # torch's writer needs the tensorboard package
            raise ImportError(
                "report_to=[tensorboard] needs the tensorboard package: "
                'pip install -e ".[trackers]"'
            ) from e
        self.writer = SummaryWriter(log_dir=str(run / "tensorboard"))

    def scalars(self, values: dict[str, float], axis: str, step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def table(self, name: str, rows: list[dict], step: int) -> None:
        self.writer.add_text(name, markdown(rows), step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    """One W&B run per iterate run, resumed by its id; each axis its own step metric."""

    one_axis = False
    flushes = False  # the W&B service writes in the background; close() waits for it
    AXES = {"train": "train/step", "iteration": "iteration/iteration"}

    def __init__(self, run: Path, ident: str, config: dict) -> None:
        import wandb

        self.wandb = wandb
        self.run = wandb.init(
            project=config["track"]["project"],
            id=ident,
            name=config["run_name"],
            resume="allow",
            dir=str(run),
            config=config,
            reinit="finish_previous",
        )
        for prefix, axis in self.AXES.items():
            self.run.define_metric(axis)
            self.run.define_metric(f"{prefix}/*", step_metric=axis)

    def scalars(self, values: dict[str, float], axis: str, step: int) -> None:
        self.run.log({**values, self.AXES[axis]: step})

    def table(self, name: str, rows: list[dict], step: int) -> None:
        if rows:
            cols = list(rows[0])
            table = self.wandb.Table(columns=cols, data=[[r[c] for c in cols] for r in rows])
            self.run.log({name: table, self.AXES["iteration"]: step})

    def close(self) -> None:
        self.run.finish()


class _Trackio:
    """A trackio run per iterate run (``resume="allow"`` by name); trackio has one step axis,
    so an iteration's row is logged at the run's optimiser step where its update ended."""

    one_axis = True
    flushes = False  # sent from a background thread; close() waits for it

    def __init__(self, run: Path, ident: str, config: dict) -> None:
        import trackio

        self.trackio = trackio
        trackio.init(project=config["track"]["project"], name=ident, config=config, resume="allow")

    def scalars(self, values: dict[str, float], axis: str, step: int) -> None:
        self.trackio.log(values, step=step)

    def table(self, name: str, rows: list[dict], step: int) -> None:
        import pandas as pd

        if rows:
            self.trackio.log({name: self.trackio.Table(dataframe=pd.DataFrame(rows))}, step=step)

    def close(self) -> None:
        self.trackio.finish()


BACKENDS = {"tensorboard": _TensorBoard, "wandb": _Wandb, "trackio": _Trackio}


def markdown(rows: list[dict]) -> str:
    """Rows as a markdown table (TensorBoard's text panel renders it)."""
    if not rows:
        return "(no samples)"
    cols = list(rows[0])
    cell = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    return head + "".join("| " + " | ".join(cell(r[c]) for c in cols) + " |\n" for r in rows)


def update_steps(run: Path, i: int) -> int:
    """Optimiser steps of iteration i's finished update (0 when it did not finish)."""
    done = Paths(run=Path(run), base_policy="").stage(i, "update") / DONE
    return read_json(done, {}).get("steps", 0)


def step_base(run: Path, i: int) -> int:
    """The run's optimiser steps before iteration i's update: its first step is this + 1."""
    return sum(update_steps(run, j) for j in range(i))


class Tracker:
    """The trackers of ``cfg.report_to`` for a burst of logging (a context manager): each
    opened when it first has something to log, closed at the end; nothing when none is
    asked for.

    ``tracker.json`` keeps, per tracker and iteration, the identity of the update it logged
    (its stage config hash: a redone update is logged anew), the last step logged and
    whether the iteration's row was. A tracker that flushes to disk (TensorBoard) has its
    progress recorded after each flush; one that sends in the background (W&B, trackio)
    after it closed. So a kill repeats at most what was logged since, and never loses a
    step; a tracker added to a run later is caught up on its own.
    """

    def __init__(self, cfg: Config, run: Path | None, enabled: bool = True) -> None:
        """``run`` None (a stage outside a run folder, as some tests train): no tracker."""
        self.cfg, self.run = cfg, Path(run or ".")
        self.names = [str(t) for t in cfg.report_to] if enabled and run is not None else []
        self.open: dict[str, object] = {}
        self.state: dict = {}  # what was logged
        self.saved: dict = {}  # what tracker.json says was logged

    def __enter__(self) -> Tracker:
        if self.names:
            self.saved = read_json(self.run / STATE, {})
            if "trackers" not in self.saved:  # the tracker run's identity, for the run's life
                ident = self.saved.get("id") or f"{self.cfg.run_name}-{secrets.token_hex(4)}"
                self.saved = {"id": ident, "trackers": {}}
                atomic_write_json(self.run / STATE, self.saved)
            self.state = copy.deepcopy(self.saved)
        return self

    def __exit__(self, *exc) -> None:
        for b in self.open.values():
            b.close()
        if self.open:
            self._save(list(self.open))
        self.open = {}

    def _backend(self, name: str):
        if name not in self.open:
            self.open[name] = BACKENDS[name](self.run, self.state["id"], plain(self.cfg))
        return self.open[name]

    def _cursor(self, name: str, i: int, update: str) -> dict:
        """What ``name`` logged of iteration i's update ``update`` (a config hash)."""
        mine = self.state["trackers"].setdefault(name, {})
        c = mine.get(str(i))
        if c is None or c["update"] != update:  # a redone update is logged anew
            c = mine[str(i)] = {"update": update, "step": 0, "row": False}
        return c

    def _save(self, names: list[str]) -> None:
        """Record what ``names`` logged (they have flushed or closed)."""
        for n in names:
            self.saved["trackers"][n] = copy.deepcopy(self.state["trackers"].get(n, {}))
        atomic_write_json(self.run / STATE, self.saved)

    def steps(self, i: int, update: str, base: int, rows: list[dict]) -> int:
        """Log iteration i's training steps (``train_log.jsonl`` lines of the update whose
        config hash is ``update``) that each tracker has not logged, at ``base + step``;
        returns how many lines were new to some tracker."""
        logged, flushed = set(), []
        for name in self.names:
            c = self._cursor(name, i, update)
            new = [r for r in rows if r["step"] > c["step"]]
            for r in new:
                values = {f"train/{k}": v for k, v in flat(r).items() if k != "step"}
                values["train/iteration"] = float(i)
                self._backend(name).scalars(values, "train", base + r["step"])
                c["step"] = r["step"]
                logged.add(r["step"])
            if new and self.open[name].flushes:
                self.open[name].flush()
                flushed.append(name)
        if flushed:
            self._save(flushed)
        return len(logged)

    def iteration(self, paths: Paths, row: dict, samples: Callable[[int], Any]) -> bool:
        """Catch up iteration ``row['iteration']``'s training steps from its
        ``train_log.jsonl``, then log its metrics row and samples table, once per tracker;
        ``samples(k)``: the table of the iteration's k best and k worst held-out responses
        (asked for only when a tracker still needs the row)."""
        if not self.names:
            return False
        i, update = row["iteration"], paths.stage(row["iteration"], "update")
        ident = read_json(update / DONE)["config_hash"]
        self.steps(i, ident, step_base(paths.run, i), read_jsonl(update / TRAIN_LOG))
        todo = [n for n in self.names if not self._cursor(n, i, ident)["row"]]
        if not todo:
            return False
        values = {f"iteration/{k}": v for k, v in flat(row).items() if k != "iteration"}
        end = step_base(paths.run, i + 1)  # the run's step where this iteration's update ended
        k = self.cfg.track.samples
        table = samples(k)
        for name in todo:
            b = self._backend(name)
            step = end if b.one_axis else i
            b.scalars(values, "iteration", step)
            b.table("iteration/samples", table, step)
            self._cursor(name, i, ident)["row"] = True
            if b.flushes:
                b.flush()
        if flushed := [n for n in todo if self.open[n].flushes]:
            self._save(flushed)
        return True
