"""RAFT (Dong et al. 2023): supervised fine-tuning on the best of n responses."""

from __future__ import annotations

import torch

from iterate.config import Config
from iterate.stages.update.common import Example, logps, run_rule
from iterate.store.paths import Paths
from iterate.train import losses


def loss_fn(model, tok, batch: list[Example], dev) -> tuple[torch.Tensor, dict[str, float]]:
    _, tokens, mask = logps(model, tok, batch, "chosen", dev)
    return losses.nll(tokens, mask), {}


def run(cfg: Config, paths: Paths, i: int, policy: str, reference: str) -> dict:
    return run_rule(cfg, paths, i, policy, reference, loss_fn, needs_ref=False)
