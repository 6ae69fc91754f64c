"""What every update rule shares: the LoRA policy, pair encoding, sequence log-probs and the
one training loop (micro-batches, gradient accumulation, clipping, non-finite steps
skipped, the step log, the crash points).

The loop runs over a batch source: an iterator of (epoch, the examples of one optimiser
step). For the pair rules (DPO, RAFT) it shuffles the pairs (``pair_steps``); for the
on-policy rules (PPO, ReMax, ``update.rl``) it rolls out before each step. A rule supplies
``loss_fn(model, micro_batch) -> (per-example losses (B,), metrics)``; the loop normalises
by the number of examples in the optimiser step, so ``micro_batch_size x grad_accum`` gives
the same update however it is split.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from iterate import faults, models, progress, seeds
from iterate.config import Config, plain
from iterate.paths import Paths
from iterate.shards import SCHEMAS, Stage, read_shards

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


# The update settings every rule reads (the training loop's); each rule names its own on top
# (``keys``), so a knob added for one rule does not invalidate finished runs of the others.
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
    keys: tuple[str, ...] = (),
    inputs: tuple[str, ...] = ("pairs",),
    extra: dict | None = None,
) -> Stage:
    """The update stage of iteration i; its identity is the settings the rule reads, the
    policy and reference, and the stages named in ``inputs``."""
    update = {k: v for k, v in plain(cfg.update).items() if k in SHARED_KEYS or k in keys}
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
        inputs=[*upstream, *paths.previous(i)],
    )


def load_examples(cfg: Config, paths: Paths, i: int, tok) -> list[Example]:
    pairs = read_shards(paths.stage(i, "pairs"), SCHEMAS["pairs"]).to_pylist()
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
    """The policy to train: LoRA adapter via peft (default) or the full model."""
    model = models.load_policy(path, str(cfg.model.dtype), dev)
    lc = cfg.update.lora
    if lc.enabled:
        from peft import LoraConfig, TaskType, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                task_type=TaskType.CAUSAL_LM,
                r=lc.r,
                lora_alpha=lc.alpha,
                lora_dropout=lc.dropout,
                target_modules=lc.target_modules,
            ),
        )
    return model


def logps(
    model, tok, examples: list[Example], which: str, dev
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed response log-probs (B,), per-token log-probs (B, T-1) and their mask."""
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
    if reference == policy:
        ref_model, ctx = (
            model,
            (model.disable_adapter() if hasattr(model, "disable_adapter") else torch.no_grad()),
        )
    else:
        ref_model, ctx = models.load_policy(reference, str(cfg.model.dtype), dev), torch.no_grad()
    ref_model.eval()
    fields = ["chosen"] + (["rejected"] if examples and examples[0].rejected is not None else [])
    bar = progress.bar(len(examples), "reference log-probs", "pair")
    with ctx:
        for b in range(0, len(examples), cfg.update.micro_batch_size):
            batch = examples[b : b + cfg.update.micro_batch_size]
            for f in fields:
                for e, lp in zip(batch, logps(ref_model, tok, batch, f, dev)[0].tolist()):
                    e.ref[f] = lp
            bar.update(len(batch))
    bar.close()
    if ref_model is not model:
        del ref_model


LossFn = Callable[[object, list[Example]], tuple[torch.Tensor, dict[str, float]]]


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


def accumulate(
    model, step: list[Example], loss_fn: LossFn, micro_batch_size: int
) -> tuple[float, dict]:
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


Step = tuple[int, list[Example]]  # (epoch, the examples of one optimiser step)


def pair_steps(cfg: Config, examples: list[Example], iteration: int) -> Iterator[Step]:
    """The pair rules' batch source: each epoch a seeded shuffle of the pairs, cut into
    optimiser steps of ``micro_batch_size x grad_accum`` examples."""
    uc = cfg.update
    g = torch.Generator().manual_seed(seeds.derive("update", cfg.seed, iteration))
    per_step = uc.micro_batch_size * uc.grad_accum
    for epoch in range(uc.epochs):
        order = torch.randperm(len(examples), generator=g).tolist()
        for s in range(0, len(order), per_step):
            yield epoch, [examples[j] for j in order[s : s + per_step]]


def steps_per_epoch(cfg: Config, n: int) -> int:
    return math.ceil(n / (cfg.update.micro_batch_size * cfg.update.grad_accum))


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


def save(model, tok, stage: Stage) -> str:
    """The adapter (LoRA) or the full model; the handoff merges and saves the policy."""
    out = stage.path / ("adapter" if hasattr(model, "peft_config") else "model")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out.name


def start(cfg: Config, i: int, policy: str) -> tuple[torch.device, object, progress.Timer]:
    """What every update stage does once it knows it has work: seed, device, the policy's
    tokenizer, and a timer for its sections."""
    torch.manual_seed(seeds.derive("update", cfg.seed, i))
    return (
        models.device(str(cfg.device)),
        models.load_tokenizer(policy, cfg.model.chat_template),
        progress.Timer(),
    )


def trainable(model, *extra: torch.nn.Module) -> list:
    return [p for m in (model, *extra) for p in m.parameters() if p.requires_grad]


def run_rule(
    cfg: Config,
    paths: Paths,
    i: int,
    policy: str,
    reference: str,
    loss_fn: LossFn,
    needs_ref: bool,
    keys: tuple[str, ...] = (),
) -> dict:
    """A pair rule's update stage (DPO, RAFT): the pairs, the policy, the one loop."""
    stage = stage_for(cfg, paths, i, policy, reference, keys)
    if stage.check(cfg.force):
        return stage.read_done()
    dev, tok, timer = start(cfg, i, policy)
    examples = load_examples(cfg, paths, i, tok)
    if not examples:
        raise ValueError(
            f"{paths.stage(i, 'pairs')}: no pairs to train on "
            "(see its _DONE.json for the drop reasons)"
        )
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
        saved = save(model, tok, stage)
    return stage.finish(
        rule=str(cfg.update.name),
        rows_in=len(examples),
        saved=saved,
        reference=reference,
        timings=timer.seconds,
        trainable_parameters=len_params(trainable(model)),
        parameters=len_params(model.parameters()),
        **result,
    )


def len_params(params: Iterable) -> int:
    return sum(p.numel() for p in params)
