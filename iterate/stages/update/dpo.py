"""DPO family (sigmoid / cDPO, IPO, hinge, optional NLL term) on cached reference log-probs."""

from __future__ import annotations

import torch

from iterate.config import Config
from iterate.stages.update.common import Example, pair_logps, run_rule
from iterate.store.paths import Paths
from iterate.train import losses


def loss_fn(cfg: Config):
    uc = cfg.update

    def fn(model, tok, batch: list[Example], dev) -> tuple[torch.Tensor, dict[str, float]]:
        got = pair_logps(model, tok, batch, dev)
        (chosen, chosen_tokens, chosen_mask), (rejected, _, _) = got["chosen"], got["rejected"]
        ref_c = torch.tensor([e.ref["chosen"] for e in batch], device=chosen.device)
        ref_r = torch.tensor([e.ref["rejected"] for e in batch], device=chosen.device)
        per_example, rc, rr = losses.dpo(
            chosen, rejected, ref_c, ref_r, uc.beta, str(uc.loss), uc.label_smoothing
        )
        if uc.nll_coef:
            per_example = per_example + uc.nll_coef * losses.nll(chosen_tokens, chosen_mask)
        return per_example, {
            "reward_accuracy": (rc > rr).float().mean().item(),
            "reward_margin": (rc - rr).mean().item(),
            "policy_chosen_logps": chosen.mean().item(),
        }

    return fn


def run(cfg: Config, paths: Paths, i: int, policy: str, reference: str) -> dict:
    return run_rule(cfg, paths, i, policy, reference, loss_fn(cfg), needs_ref=True)
