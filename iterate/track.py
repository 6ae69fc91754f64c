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
folder keeps the tracker run's identity and what was logged (``tracker.json``): a resumed
run continues the same tracker run, and a step already logged is not logged again, whether
the training loop logged it live or the iteration's end caught it up from
``train_log.jsonl`` (a run that gains ``report_to`` later is caught up whole).
"""

from __future__ import annotations

import json
import logging
import secrets
from pathlib import Path

from iterate.config import Config, plain
from iterate.paths import Paths
from iterate.shards import atomic_write_json

log = logging.getLogger(__name__)

STATE = "tracker.json"


def flat(row: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a row, nested keys joined by ``/`` (``seconds/update``); booleans as
    1 or 0; strings and missing values left out."""
    out: dict[str, float] = {}
    for k, v in row.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}/"))
        elif isinstance(v, bool):
            out[prefix + k] = float(v)
        elif isinstance(v, int | float):
            out[prefix + k] = float(v)
    return out


class _TensorBoard:
    one_axis = False  # each tag its own steps: an iteration's row at the iteration

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
    AXES = {"train": "train/step", "iteration": "iteration/iteration"}

    def __init__(self, run: Path, ident: str, config: dict) -> None:
        import wandb

        self.wandb = wandb
        self.run = wandb.init(
            project=config["track"]["project"], id=ident, name=config["run_name"],
            resume="allow", dir=str(run), config=config, reinit="finish_previous",
        )  # fmt: skip
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

    def flush(self) -> None:
        pass  # the W&B service writes as it receives

    def close(self) -> None:
        self.run.finish()


class _Trackio:
    """A trackio run per iterate run (``resume="allow"`` by name); trackio has one step axis,
    so an iteration's row is logged at the run's optimiser step where its update ended."""

    one_axis = True

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

    def flush(self) -> None:
        pass

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
    done = Paths(run=Path(run), base_policy="").stage(i, "update") / "_DONE.json"
    return json.loads(done.read_text()).get("steps", 0) if done.exists() else 0


def step_base(run: Path, i: int) -> int:
    """The run's optimiser steps before iteration i's update: its first step is this + 1."""
    return sum(update_steps(run, j) for j in range(i))


class Tracker:
    """The trackers of ``cfg.report_to`` for a burst of logging (a context manager); does
    nothing when none is asked for."""

    def __init__(self, cfg: Config, run: Path | None, enabled: bool = True) -> None:
        """``run`` None (a stage outside a run folder, as some tests train): no tracker."""
        self.cfg, self.run = cfg, Path(run or ".")
        self.names = [str(t) for t in cfg.report_to] if enabled and run is not None else []
        self.backends: list = []
        self.state: dict = {}

    def __enter__(self) -> Tracker:
        if not self.names:
            return self
        path = self.run / STATE
        self.state = json.loads(path.read_text()) if path.exists() else {}
        if "id" not in self.state:  # the tracker run's identity: kept for the run's life
            self.state = {"id": f"{self.cfg.run_name}-{secrets.token_hex(4)}", "steps": {},
                          "iterations": []}  # fmt: skip
            atomic_write_json(path, self.state)
        config = plain(self.cfg)
        self.backends = [BACKENDS[n](self.run, self.state["id"], config) for n in self.names]
        return self

    def __exit__(self, *exc) -> None:
        for b in self.backends:
            b.close()
        self.backends = []

    def _save(self) -> None:
        """Flush every tracker, then record what was logged: a kill between the two logs
        a step twice at most once, never loses one."""
        for b in self.backends:
            b.flush()
        atomic_write_json(self.run / STATE, self.state)

    def steps(self, i: int, base: int, rows: list[dict]) -> int:
        """Log iteration i's training steps (``train_log.jsonl`` lines) not logged yet, at
        ``base + step``; returns how many were logged."""
        if not self.backends:
            return 0
        done = self.state["steps"].get(str(i), 0)
        new = [r for r in rows if r["step"] > done]
        for r in new:
            values = {f"train/{k}": v for k, v in flat(r).items() if k != "step"}
            for b in self.backends:
                b.scalars({**values, "train/iteration": float(i)}, "train", base + r["step"])
            self.state["steps"][str(i)] = r["step"]
        if new:
            self._save()
        return len(new)

    def iteration(self, paths: Paths, row: dict) -> bool:
        """Catch up iteration ``row['iteration']``'s training steps from its
        ``train_log.jsonl``, then log its metrics row and its samples table, once."""
        if not self.backends:
            return False
        from iterate import runinfo

        i = row["iteration"]
        log_path = paths.stage(i, "update") / "train_log.jsonl"
        if log_path.exists():
            rows = [json.loads(line) for line in log_path.read_text().splitlines() if line]
            self.steps(i, step_base(paths.run, i), rows)
        if i in self.state["iterations"]:
            return False
        values = {f"iteration/{k}": v for k, v in flat(row).items() if k != "iteration"}
        end = step_base(paths.run, i + 1)  # the run's step where this iteration's update ended
        samples = runinfo.extremes(
            runinfo.scored(paths.run, i, heldout=True), self.cfg.track.samples
        )
        for b in self.backends:
            step = end if b.one_axis else i
            b.scalars(values, "iteration", step)
            b.table("iteration/samples", samples, step)
        self.state["iterations"].append(i)
        self._save()
        return True
