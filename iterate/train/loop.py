"""The one training loop: every model trained here is stepped by ``optimise``.

The policy in each update rule (``stages.update.training``: the stage's log file, trackers,
ranks and crash points come in through ``on_step``), the reward model
(``stages.reward_model.fit``) and the toy world's SFT (``toy.build.sft``). A caller gives
the steps (each an epoch and the examples of one optimiser step) and ``step_loss``, which
runs forward and backward over a step's examples in its own micro-batches and returns the
step's loss and metrics; the loop clears the gradients, ends each step the same way
(``apply_step``: clip, and skip a step whose loss or gradient is not finite, so one bad
batch cannot put NaN into the weights), advances the learning-rate schedule, and hands one
row per step to ``on_step``."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from iterate import progress

Step = tuple[int, list[Any]]  # (epoch, the examples of one optimiser step)


def shuffled(n: int, per_step: int, epochs: int, g: torch.Generator) -> Iterator[Step]:
    """Each epoch a shuffle of ``range(n)`` drawn from ``g``, cut into steps of ``per_step``
    indices: (epoch, a step's indices). Lazy: the next epoch is drawn after this one's
    steps are taken (so a caller may draw from ``g`` in between)."""
    for epoch in range(epochs):
        order = torch.randperm(n, generator=g).tolist()
        for start in range(0, n, per_step):
            yield epoch, order[start : start + per_step]


def apply_step(
    opt, params: list, max_grad_norm: float, loss: float, clip: Callable | None = None
) -> tuple[bool, float]:
    """Clip (``clip(max_norm)`` -> the norm before clipping, where the gradients are spread
    over processes; else ``clip_grad_norm_`` over ``params``) and step, unless ``loss`` or
    the gradient norm is not finite: then skip. The gradients are cleared either way.
    Returns (stepped, grad norm)."""
    if clip is None:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm).item()
    else:
        grad_norm = clip(max_grad_norm)
    ok = math.isfinite(loss) and math.isfinite(grad_norm)
    if ok:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return ok, grad_norm


def optimise(
    model,
    opt,
    params: list,
    steps: Iterable[Step],
    step_loss: Callable[[list], tuple[float, dict]],
    *,
    total: int,
    desc: str,
    max_grad_norm: float = 1.0,
    clip: Callable | None = None,
    schedule=None,
    on_step: Callable[[dict], dict] = lambda row: row,
) -> dict:
    """One optimiser step per item of ``steps``: ``step_loss(examples)`` -> (loss, metrics)
    after the gradients are cleared, then ``apply_step``, then ``schedule.step()``. A step
    with no examples (an on-policy step whose rollouts were all left out) takes no
    optimiser step (AdamW's momentum and weight decay would still move the weights) and is
    counted. Each step's row (step, epoch, examples, loss, grad_norm, the learning rate it
    stepped with, skipped, the metrics) goes to ``on_step``, which returns it as recorded.
    Leaves the model in eval mode. Returns the number of steps, of skipped and of empty
    ones, and the last row as recorded (``final``)."""
    bar = progress.bar(total, desc, "step")
    step, skipped, empty, last = 0, 0, 0, {}
    for step, (epoch, examples) in enumerate(steps, 1):
        if not examples:
            empty += 1
            last = on_step({"step": step, "epoch": epoch, "examples": 0, "empty": True})
            bar.update(1)
            continue
        model.train()
        opt.zero_grad(set_to_none=True)
        loss, metrics = step_loss(examples)
        lr = opt.param_groups[0]["lr"]
        ok, grad_norm = apply_step(opt, params, max_grad_norm, loss, clip)
        if schedule is not None:
            schedule.step()
        skipped += not ok
        row = {
            "step": step,
            "epoch": epoch,
            "examples": len(examples),
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": lr,
            "skipped": not ok,
            **metrics,
        }
        last = on_step(row)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
    bar.close()
    model.eval()
    return {"steps": step, "skipped_steps": skipped, "empty_steps": empty, "final": last}


def rounded(row: dict, places: int = 6) -> dict:
    """A log row as it is written: floats to ``places`` decimals."""
    return {k: (round(v, places) if isinstance(v, float) else v) for k, v in row.items()}
