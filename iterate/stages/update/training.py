"""Every update rule's training: its optimiser steps over a batch source, through the one
loop (``train.loop.optimise``).

A batch source is an iterator of (epoch, the examples of one optimiser step): the pair
rules shuffle their pairs (``common.pair_steps``); the on-policy rules roll out before each
step (``rl.rollout_steps``). A rule supplies ``loss_fn(model, micro_batch) -> (per-example
losses (B,), metrics)``; ``accumulate`` adds up gradients over micro-batches, normalised by
the number of examples in the optimiser step, so ``micro_batch_size x grad_accum`` gives
the same update however it is split. The loop clips, skips (and counts) a step whose loss or
gradient is not finite and counts a step with no examples; this stage writes one line per
step to ``train_log.jsonl`` (and to the trackers of ``report_to``, from the main process),
runs under several processes (``dist``) and passes the crash points of the resume tests.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from functools import partial

import torch

from iterate import faults, track
from iterate.config import Config
from iterate.stages.update import dist
from iterate.store.paths import TRAIN_LOG
from iterate.store.shards import write_plan
from iterate.store.stage import Stage, config_hash
from iterate.train import models
from iterate.train.loop import Step, optimise, rounded

LossFn = Callable[[object, list], tuple[torch.Tensor, dict[str, float]]]


def log_step(logf, row: dict) -> dict:
    """One line of train_log.jsonl, flushed so a crash keeps the log so far; returns it as
    written (floats to 6 decimals), which the trackers get too."""
    row = rounded(row)
    logf.write(json.dumps(row) + "\n")
    logf.flush()
    return row


def accumulate(
    model, step: list, loss_fn: LossFn, micro_batch_size: int, max_tokens: int = 0
) -> tuple[float, dict]:
    """Backward over one optimiser step's examples in micro-batches (``models.micro_batches``:
    at most ``micro_batch_size`` rows and ``max_tokens`` tokens each, rows of like length
    together); gradients add up to those of the whole step's mean loss, however it is split.
    Under several processes each rank takes its share (``dist.share``) and the gradients are
    summed across ranks once, at the step's last backward; a rank with no share backs a
    zero-weighted example so the all-reduce still meets. Returns (loss, metrics) of the
    whole step, ``padding`` among them: the share of the tokens fed that were padding."""
    mine, weight = dist.share(step), 1.0
    if not mine:
        mine, weight = step[:1], 0.0
    total, metrics, real, fed = 0.0, {}, 0, 0
    batches = models.micro_batches(mine, micro_batch_size, max_tokens)
    for m, batch in enumerate(batches):
        with dist.no_sync(model, last=m == len(batches) - 1):
            per_example, mb_metrics = loss_fn(model, batch)
            loss = per_example.sum() * (weight / len(step))
            dist.backward(loss)
        total += loss.item()
        for k, v in mb_metrics.items():
            metrics[k] = metrics.get(k, 0.0) + v * weight * len(batch) / len(step)
        real += sum(sum(e.lengths()) for e in batch) * weight
        fed += models.padded_tokens(batch) * weight
    if dist.world() > 1:
        total, real, fed, *values = dist.sum_floats([total, real, fed, *metrics.values()])
        metrics = dict(zip(metrics, values))
    return total, {**metrics, "padding": 1 - real / fed if fed else 0.0}


def train(
    cfg: Config,
    model,
    params: list,
    steps: Iterable[Step],
    total: int,
    loss_fn: LossFn,
    stage: Stage,
    iteration: int,
) -> dict:
    """AdamW over ``params`` through the one loop (``train.loop.optimise``), one optimiser
    step per item of ``steps`` (accumulated over micro-batches), one JSON line per step in
    train_log.jsonl, the trackers fed and the crash points passed after each."""
    uc = cfg.update
    opt = torch.optim.AdamW(params, lr=uc.lr, weight_decay=uc.weight_decay)
    model, opt = dist.prepare(model, opt)  # DDP / FSDP / DeepSpeed under several processes
    log_path = stage.path / TRAIN_LOG
    if dist.is_main():
        stage.path.mkdir(parents=True, exist_ok=True)
        log_path.unlink(missing_ok=True)  # an interrupted update starts again from its beginning
        write_plan(stage.path, "steps", total)
    tracker = track.Tracker(cfg, stage.root, enabled=dist.is_main())
    base = track.step_base(stage.root, iteration) if tracker.names else 0  # steps before these
    update = config_hash(stage.config)  # the identity the trackers log these steps under

    with open(log_path if dist.is_main() else os.devnull, "a") as logf, tracker:

        def on_step(row: dict) -> dict:
            row = log_step(logf, row)
            tracker.steps(iteration, update, base, [row])
            faults.point(iteration, "update", row["step"])
            return row

        return optimise(
            model,
            opt,
            params,
            steps,  # an on-policy source rolls out here, between steps
            partial(
                accumulate,
                model,
                loss_fn=loss_fn,
                micro_batch_size=uc.micro_batch_size,
                max_tokens=uc.max_tokens_per_micro_batch,
            ),
            total=total,
            desc=f"update ({uc.name})",
            max_grad_norm=uc.max_grad_norm,
            clip=partial(dist.clip, model, params),  # (the processes' whole gradient)
            on_step=on_step,
        )


def trainable(model, *extra: torch.nn.Module) -> list:
    return [p for m in (model, *extra) for p in m.parameters() if p.requires_grad]


def len_params(params: Iterable) -> int:
    return sum(p.numel() for p in params)
