"""The toy world's prompt writer: a model of the policy's size taught to write a new
instruction of the family shown to it, the generator of synthetic prompts
(``prompts=self_instruct``) in the toy world, where the policy itself cannot write prompts.

Its data: a request showing three instructions of one family from the training split, and
as the answer an instruction of that family that is not among the toy world's instructions,
drawn from the family's whole grammar (``world.random_instruction``), so it learns to
compose instructions nobody wrote. Built once next to the toy world, on first use.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import torch

from iterate.config import ToyConfig
from iterate.store import cachekey
from iterate.synthetic import request
from iterate.toy import build, world
from iterate.train import models


def data(cfg: ToyConfig, tokenizer, examples: int = 3) -> list[tuple[list[int], int]]:
    rng = random.Random(cfg.seed + 7)
    train, _ = world.split(cfg.heldout_fraction)
    by_family = {f: [i.prompt for i in train if i.family == f] for f in world.FAMILIES}
    known = {i.prompt for i in world.INSTRUCTIONS}
    out = []
    for _ in range(cfg.writer_examples):
        family = rng.choice(world.FAMILIES)
        shown = rng.sample(by_family[family], examples)
        target = world.random_instruction(family, rng).prompt
        while target in known and family != "greeting":  # greetings: none is new
            target = world.random_instruction(family, rng).prompt
        out.append(build.encode_example(tokenizer, request(shown), target))
    return out


def ensure(cfg: ToyConfig) -> Path:
    """The prompt writer's folder, built on first use (about as long as the toy policy)."""
    policy = build.ensure(cfg)
    recipe = cachekey.code_hash(__name__)[:6]  # an edited recipe rebuilds
    out = policy.with_name(
        f"{policy.name}-writer-{cfg.writer_examples}x{cfg.writer_epochs}-{recipe}"
    )

    def make(tmp: Path) -> dict:
        torch.manual_seed(cfg.seed + 7)
        tmp.mkdir(parents=True, exist_ok=True)
        tokenizer = models.load_tokenizer(str(policy))
        model = build.new_policy(cfg, tokenizer)
        sft = dataclasses.replace(cfg, sft_epochs=cfg.writer_epochs)
        losses = build.sft(sft, model, tokenizer, data(cfg, tokenizer))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        last = losses[-20:]
        return {"config_hash": build.config_hash(cfg), "sft_final_loss": sum(last) / len(last)}

    return cachekey.cached(
        out, "the toy prompt writer", make, lambda i: f"SFT loss {i['sft_final_loss']:.3f}"
    )
