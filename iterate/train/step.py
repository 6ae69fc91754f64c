"""How every optimiser step ends, the policy's and the reward model's alike: clip the
gradient, and step unless the loss or the gradient is not finite (then skip, so one bad
batch cannot put NaN into the weights)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


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
