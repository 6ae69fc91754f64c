"""What every update rule shares: the policy to train (LoRA via peft, or the full model),
the update stage's identity, sequence log-probs, and the pair rules' side: pairs as
examples, reference log-probs computed once, their batch source (``pair_steps``) and their
stage (``run_rule``). The training loop itself is ``iterate.stages.update.training``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from iterate import progress
from iterate.config import Config, plain
from iterate.errors import BadInput
from iterate.stages.update import dist
from iterate.stages.update.training import LossFn, Step, len_params, train, trainable
from iterate.store import seeds
from iterate.store.paths import Paths
from iterate.store.shards import SCHEMAS, read_json, read_shards
from iterate.store.stage import DONE, Stage
from iterate.train import models
from iterate.train.loop import shuffled
from iterate.train.rules import rule

log = logging.getLogger(__name__)


@dataclass
class Example:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int] | None = None
    ref: dict[str, float] = field(default_factory=dict)  # reference log-probs, computed once
    rollout: dict[str, Any] = field(
        default_factory=dict
    )  # on-policy rules: score, per-token tensors

    def lengths(self) -> tuple[int, ...]:
        """The lengths of the sequences it feeds the model (``models.fed_tokens``): a pair's
        prompt, chosen and rejected (the prompt run once, ``pair_logps``), else its
        prompt+response."""
        if self.rejected is None:
            return (len(self.prompt) + len(self.chosen),)
        return len(self.prompt), len(self.chosen), len(self.rejected)


# The update settings every rule reads (the training loop's); each rule's row in
# ``iterate.train.rules`` names its own on top, so a knob added for one rule does not invalidate
# finished runs of the others.
SHARED_KEYS = (
    "name",
    "lr",
    "epochs",
    "micro_batch_size",
    "grad_accum",
    "max_grad_norm",
    "weight_decay",
    "lora",
)


def stage_for(
    cfg: Config,
    paths: Paths,
    i: int,
    policy: str,
    reference: str,
    inputs: tuple[str, ...] = ("pairs",),
    extra: dict | None = None,
    made_by: list[Path] = (),
) -> Stage:
    """The update stage of iteration i; its identity is the settings the rule reads, the
    policy and reference, the stages of the iteration named in ``inputs``, and ``made_by``
    (the stages that made what it scores with)."""
    keys = (*SHARED_KEYS, *rule(cfg.update.name).keys)
    update = {k: v for k, v in plain(cfg.update).items() if k in keys}
    conf = {
        "update": update,
        "policy": policy,
        "reference": reference,
        "seed": cfg.seed,
        "dtype": str(cfg.model.dtype),
    }
    conf["max_length"], conf["chat_template"] = cfg.model.max_length, cfg.model.chat_template
    upstream = [paths.stage(i, s) for s in inputs]
    return Stage(
        paths.stage(i, "update"),
        "update",
        {**conf, **(extra or {})},
        inputs=[*upstream, *paths.previous(i), *made_by],
    )


def load_examples(cfg: Config, paths: Paths, i: int, tok) -> list[Example]:
    columns = ["prompt", "chosen_ids", "rejected_ids"]  # not the texts of the responses
    pairs = read_shards(paths.stage(i, "pairs"), SCHEMAS["pairs"], columns).to_pylist()
    limit = cfg.model.max_length
    out = []
    for (
        p
    ) in pairs:  # the sampled token ids (EOS only where the sample ended), not re-tokenized text
        prompt = models.prompt_ids(tok, p["prompt"])
        room = max(1, limit - len(prompt))
        rejected = None if p["rejected_ids"] is None else list(p["rejected_ids"])[:room]
        out.append(Example(prompt, list(p["chosen_ids"])[:room], rejected))
    return out


def policy_model(cfg: Config, path: str, dev: torch.device):
    """The policy to train: LoRA adapter via peft (default) or the full model, its trained
    weights in float32 (``models.for_training``); with ``update.gradient_checkpointing`` its
    activations are recomputed in the backward pass (less memory at length, about a third
    more compute)."""
    model = models.load_policy(path, str(cfg.model.dtype), dev)
    if cfg.update.gradient_checkpointing:
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return models.for_training(models.with_lora(model, cfg.update.lora), cfg.model.dtype, dev)


def pair_logps(
    model, tok, examples: list[Example], dev
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per response of the examples (chosen, and rejected where they have it): summed
    log-probs (B,), per-token log-probs and their mask, each prompt run once
    (``models.shared_prompt_logps``); under gradient checkpointing, which keeps no cache in
    training, each prompt+response whole (``logps``)."""
    fields = ["chosen"] + (["rejected"] if examples[0].rejected is not None else [])
    if model.training and getattr(model, "is_gradient_checkpointing", False):
        return {f: logps(model, tok, examples, f, dev) for f in fields}
    got = models.shared_prompt_logps(
        model,
        tok.pad_token_id,
        [e.prompt for e in examples],
        [[getattr(e, f) for e in examples] for f in fields],
        dev,
    )
    return dict(zip(fields, got))


def logps(
    model, tok, examples: list[Example], which: str, dev
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed response log-probs (B,), per-token log-probs (B, T-1) and their mask, each
    prompt+response run whole."""
    responses = [getattr(e, which) for e in examples]
    ids, mask, resp = models.sequence_batch(tok, [e.prompt for e in examples], responses, dev)
    tl = models.token_logps(model, ids, mask) * resp
    return tl.sum(-1), tl, resp


@torch.no_grad()
def reference_logps(
    cfg: Config, model, tok, examples: list[Example], policy: str, reference: str, dev
) -> None:
    """Fill ``Example.ref`` once per pair, before any update.

    When the reference is the policy being trained, it is the same model with the LoRA
    adapter disabled (or, for full fine-tuning, the model before its first step): no second
    copy in memory. Otherwise the reference is loaded, used and freed.
    """
    ref_model = None
    if reference != policy:
        ref_model = models.load_policy(reference, str(cfg.model.dtype), dev)
    mine = dist.share(list(range(len(examples))))  # under several processes: this rank's share
    bar = progress.bar(len(mine), "reference log-probs", "pair")
    found = []
    uc = cfg.update
    cut = models.micro_batches(
        mine, uc.micro_batch_size, uc.max_tokens_per_micro_batch, lambda j: examples[j].lengths()
    )
    with models.reference_of(model, ref_model) as ref:
        ref.eval()
        for idx in cut:
            batch = [examples[j] for j in idx]
            lps = {f: v[0].tolist() for f, v in pair_logps(ref, tok, batch, dev).items()}
            found += [(j, {f: v[n] for f, v in lps.items()}) for n, j in enumerate(idx)]
            bar.update(len(batch))
    bar.close()
    for j, ref in dist.gather(found):
        examples[j].ref.update(ref)
    del ref_model  # a reference of its own is freed here


# group_by_length: the pairs of this many steps sorted by length, then cut into steps
LENGTH_GROUP_STEPS = 50


def pair_steps(cfg: Config, examples: list[Example], iteration: int) -> Iterator[Step]:
    """The pair rules' batch source: each epoch a seeded shuffle of the pairs, cut into
    optimiser steps of ``micro_batch_size x grad_accum`` examples. With
    ``update.group_by_length`` each window of ``LENGTH_GROUP_STEPS`` steps' pairs is sorted
    by length before it is cut (steps of like length: less padding), and its steps come in
    a seeded random order (as transformers' length-grouped sampler)."""
    uc = cfg.update
    g = torch.Generator().manual_seed(seeds.derive("update", cfg.seed, iteration))
    per_step = uc.micro_batch_size * uc.grad_accum
    window = per_step * (LENGTH_GROUP_STEPS if uc.group_by_length else 1)
    for epoch, part in shuffled(len(examples), window, uc.epochs, g):
        if uc.group_by_length:
            part.sort(key=lambda j: sum(examples[j].lengths()), reverse=True)
        steps = [part[s : s + per_step] for s in range(0, len(part), per_step)]
        if uc.group_by_length:
            steps = [steps[k] for k in torch.randperm(len(steps), generator=g).tolist()]
        for idx in steps:
            yield epoch, [examples[j] for j in idx]


def steps_per_epoch(cfg: Config, n: int) -> int:
    return math.ceil(n / (cfg.update.micro_batch_size * cfg.update.grad_accum))


def save(model, tok, paths: Paths, i: int) -> str:
    """The adapter (LoRA) or the full model (``Paths.update_output``); the handoff merges
    and saves the policy. Under several processes every rank takes part in gathering the
    weights, rank 0 writes."""
    out = paths.update_output(i, adapter=hasattr(model, "peft_config"))
    state = dist.state_dict(model)
    if dist.is_main():
        model.save_pretrained(out, **({"state_dict": state} if state is not None else {}))
        tok.save_pretrained(out)
    return out.name


def start(cfg: Config, i: int, policy: str) -> tuple[torch.device, object, progress.Timer]:
    """What every update stage does once it knows it has work: seed, device, the policy's
    tokenizer, and a timer for its sections."""
    torch.manual_seed(seeds.derive("update", cfg.seed, i))
    return (
        dist.device(models.device(str(cfg.device))),
        models.load_tokenizer(policy, cfg.model.chat_template),
        progress.Timer(),
    )


def no_pairs(paths: Paths, i: int) -> str:
    """Why iteration i has no pairs: the reward scored no response (inf, NaN or None for
    each), or it scored a prompt's samples alike (ties)."""
    label = read_json(paths.stage(i, "label") / DONE, {})
    if label.get("rows_in") and not label.get("rows_out"):
        return (
            f"{paths.stage(i, 'label')}: the reward scored none of the {label['rows_in']} "
            f"responses (dropped: {label.get('dropped')}): a reward of inf, NaN or None "
            "for every response has nothing to learn from; check reward.function or "
            "reward.sources"
        )
    dropped = read_json(paths.stage(i, "pairs") / DONE, {}).get("dropped", {})
    return (
        f"{paths.stage(i, 'pairs')}: no pairs to train on (dropped: {dropped}); when the "
        "reward scores a prompt's samples alike (tie), more samples (generate.n) or a "
        "reward that tells them apart gives pairs"
    )


def run_rule(
    cfg: Config,
    paths: Paths,
    i: int,
    policy: str,
    reference: str,
    loss_fn: LossFn,
    needs_ref: bool,
) -> dict:
    """A pair rule's update stage (DPO, RAFT): the pairs, the policy, the one loop."""
    stage = stage_for(cfg, paths, i, policy, reference)
    if dist.world() == 1:  # the loop's process: skip a finished stage, or launch the ranks
        if stage.check(cfg.force):
            return stage.read_done()
        if cfg.update.num_processes > 1:
            return dist.launch(cfg, paths, i, policy, reference, stage)
    dev, tok, timer = start(cfg, i, policy)
    examples = load_examples(cfg, paths, i, tok)
    if not examples:
        raise BadInput(no_pairs(paths, i))
    with timer("load_s"):
        model = policy_model(cfg, policy, dev)
    if needs_ref:
        with timer("reference_s"):
            reference_logps(cfg, model, tok, examples, policy, reference, dev)
    with timer("train_s"):
        total = cfg.update.epochs * steps_per_epoch(cfg, len(examples))
        fn = lambda m, b: loss_fn(m, tok, b, dev)  # noqa: E731
        result = train(
            cfg, model, trainable(model), pair_steps(cfg, examples, i), total, fn, stage, i
        )
    with timer("save_s"):
        saved = save(model, tok, paths, i)
    if not dist.is_main():
        return {}
    return stage.finish(
        rule=str(cfg.update.name),
        rows_in=len(examples),
        saved=saved,
        reference=reference,
        timings=timer.seconds,
        trainable_parameters=len_params(trainable(model)),
        parameters=len_params(model.parameters()),
        processes=dist.world(),
        **result,
    )
