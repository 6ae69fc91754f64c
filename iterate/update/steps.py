"""The one training loop of every update rule: optimiser steps over a batch source.

A batch source is an iterator of (epoch, the examples of one optimiser step): the pair
rules shuffle their pairs (``common.pair_steps``); the on-policy rules roll out before each
step (``rl.rollout_steps``). A rule supplies ``loss_fn(model, micro_batch) -> (per-example
losses (B,), metrics)``; the loop accumulates gradients over micro-batches, normalised by
the number of examples in the optimiser step, so ``micro_batch_size x grad_accum`` gives
the same update however it is split. It clips, skips (and counts) a step whose loss or
gradient is not finite, writes one line per step to ``train_log.jsonl`` and passes the
crash points of the resume tests.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from iterate import faults, progress
from iterate.config import Config
from iterate.shards import Stage

Step = tuple[int, list[Any]]  # (epoch, the examples of one optimiser step)
LossFn = Callable[[object, list], tuple[torch.Tensor, dict[str, float]]]


def apply_step(opt, params, max_grad_norm: float, loss: float) -> tuple[bool, float]:
    """Clip and step, unless the loss or the gradient is not finite: then skip (and clear
    the gradients). Returns (stepped, grad norm)."""
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm).item()
    ok = math.isfinite(loss) and math.isfinite(grad_norm)
    if ok:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return ok, grad_norm


def log_step(logf, row: dict) -> dict:
    """One line of train_log.jsonl, flushed so a crash keeps the log so far."""
    logf.write(
        json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}) + "\n"
    )
    logf.flush()
    return row


def accumulate(model, step: list, loss_fn: LossFn, micro_batch_size: int) -> tuple[float, dict]:
    """Backward over one optimiser step's examples in micro-batches; gradients add up to
    those of the whole step's mean loss, however it is split. Returns (loss, metrics)."""
    total, metrics = 0.0, {}
    for m in range(0, len(step), micro_batch_size):
        batch = step[m : m + micro_batch_size]
        per_example, mb_metrics = loss_fn(model, batch)
        loss = per_example.sum() / len(step)
        loss.backward()
        total += loss.item()
        for k, v in mb_metrics.items():
            metrics[k] = metrics.get(k, 0.0) + v * len(batch) / len(step)
    return total, metrics


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
    """The one training loop: AdamW over ``params``, one optimiser step per item of
    ``steps`` (accumulated over micro-batches), one JSON line per step in train_log.jsonl."""
    uc = cfg.update
    opt = torch.optim.AdamW(params, lr=uc.lr, weight_decay=uc.weight_decay)
    log_path = stage.path / "train_log.jsonl"
    stage.path.mkdir(parents=True, exist_ok=True)
    log_path.unlink(missing_ok=True)  # an interrupted update starts again from its beginning
    bar = progress.bar(total, f"update ({uc.name})", "step")
    step, skipped, last = 0, 0, {}
    with open(log_path, "a") as logf:
        for epoch, examples in steps:  # an on-policy source rolls out here, between steps
            model.train()
            opt.zero_grad(set_to_none=True)
            loss, metrics = accumulate(model, examples, loss_fn, uc.micro_batch_size)
            ok, grad_norm = apply_step(opt, params, uc.max_grad_norm, loss)
            skipped += not ok
            step += 1
            row = {
                "step": step,
                "epoch": epoch,
                "loss": loss,
                "grad_norm": grad_norm,
                "skipped": not ok,
                **metrics,
            }
            last = log_step(logf, row)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            faults.point(iteration, "update", step)
    bar.close()
    model.eval()
    return {"steps": step, "skipped_steps": skipped, "final": last}


def trainable(model, *extra: torch.nn.Module) -> list:
    return [p for m in (model, *extra) for p in m.parameters() if p.requires_grad]


def len_params(params: Iterable) -> int:
    return sum(p.numel() for p in params)
