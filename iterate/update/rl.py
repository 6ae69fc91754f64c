"""What the on-policy rules (PPO, ReMax) share: rollouts from the current LoRA policy, a
frozen reward model, and per-token log-probs of the policy and of the reference (the same
model with the adapter disabled)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from iterate import models, reward_model
from iterate.config import Config
from iterate.paths import Paths
from iterate.prompts import as_messages
from iterate.shards import read_shards


@dataclass
class Rollout:
    ids: torch.Tensor  # (B, T) prompt + response, right-padded
    mask: torch.Tensor  # (B, T) attention mask
    resp: torch.Tensor  # (B, T-1) response-token mask over the shifted log-prob positions
    texts: list[str]
    scores: torch.Tensor  # (B,) reward-model scores


def prompt_batches(cfg: Config, paths: Paths, i: int, tok) -> list[tuple[str, list[int]]]:
    """The iteration's prompts (text, chat-template ids), in the prompts stage's order."""
    table = read_shards(paths.stage(i, "prompts"))
    limit = cfg.model.max_length - cfg.generate.max_tokens
    out = [(t, models.prompt_ids(tok, t)) for t in table["prompt"].to_pylist()]
    return [(t, ids) for t, ids in out if len(ids) <= limit]


@torch.no_grad()
def rollout(cfg: Config, model, tok, rm, rm_tok, prompts: list[tuple[str, list[int]]], greedy: bool, dev) -> Rollout:
    """One response per prompt (sampled, or greedy), scored by the frozen reward model."""
    gc = cfg.generate
    ids, mask = models.pad([p for _, p in prompts], tok.pad_token_id, side="left")
    was_training = model.training
    model.eval()
    kw = {"do_sample": False} if greedy else {"do_sample": True, "temperature": gc.temperature, "top_p": gc.top_p, "top_k": 0}
    out = model.generate(
        input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=gc.max_tokens,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **kw,
    )  # fmt: skip
    model.train(was_training)
    responses = []
    for seq in out[:, ids.shape[1] :].tolist():
        responses.append(seq[: seq.index(tok.eos_token_id) + 1] if tok.eos_token_id in seq else seq)
    texts = [tok.decode(r, skip_special_tokens=True) for r in responses]
    seqs = [reward_model.encode(rm_tok, as_messages(p), t, cfg.reward.max_length) for (p, _), t in zip(prompts, texts)]
    scores = torch.tensor(reward_model.score(rm, rm_tok, seqs, desc="rollout reward"), device=dev)
    full, fmask, resp = models.sequence_batch(tok, [p for _, p in prompts], responses, dev)
    return Rollout(full, fmask, resp, texts, scores)


def logps(model, r: Rollout) -> torch.Tensor:
    return models.token_logps(model, r.ids, r.mask) * r.resp


@torch.no_grad()
def ref_logps(model, ref_model, r: Rollout) -> torch.Tensor:
    """Reference log-probs: a separate frozen model when given, else the policy with its
    LoRA adapter disabled (no second copy)."""
    if ref_model is not None:
        return logps(ref_model, r)
    with model.disable_adapter():
        return logps(model, r)


def load_reward_model(cfg: Config, paths: Paths, dev):
    rm, rm_tok = reward_model.load_model(paths.reward_model, str(cfg.reward.dtype))
    for p in rm.parameters():
        p.requires_grad_(False)
    return rm.to(dev), rm_tok


def run_on_policy(cfg: Config, paths: Paths, i: int, policy: str, reference: str, make_batch, step_loss, passes: int, keys: tuple[str, ...], head_fn=None) -> dict:
    """The on-policy training loop: per batch of prompts, roll out (``make_batch``), then
    ``passes`` optimiser steps on it (``step_loss``). ``head_fn(model)`` adds trainable
    modules (PPO's value head). One ``train_log.jsonl`` line per step."""
    import math

    from iterate import faults, progress
    from iterate.update import common

    uc = cfg.update
    stage = common.stage_for(cfg, paths, i, policy, reference, keys)
    stage.config["reward_model"] = paths.reward_model
    if stage.check(cfg.force):
        return stage.read_done()
    dev, tok, timer = common.start(cfg, i, policy)
    with timer("load_s"):
        model = common.policy_model(cfg, policy, dev)
        lora = hasattr(model, "disable_adapter")
        ref_model = None if (reference == policy and lora) else models.load_policy(reference, str(cfg.model.dtype), dev)
        rm, rm_tok = load_reward_model(cfg, paths, dev)
    head = head_fn(model).to(dev) if head_fn else None
    params = [p for p in model.parameters() if p.requires_grad] + (list(head.parameters()) if head else [])
    opt = torch.optim.AdamW(params, lr=uc.lr, weight_decay=uc.weight_decay)
    prompts = prompt_batches(cfg, paths, i, tok)
    g = torch.Generator().manual_seed(cfg.seed * 1000 + i)
    n_batches = math.ceil(len(prompts) / uc.micro_batch_size)
    stage.path.mkdir(parents=True, exist_ok=True)
    log_path = stage.path / "train_log.jsonl"
    log_path.unlink(missing_ok=True)
    bar = progress.bar(uc.epochs * n_batches * passes, f"update ({uc.name})", "step")
    step, skipped, last, state = 0, 0, {}, {"kl_coef": uc.kl_coef}
    model.train()
    with timer("train_s"), open(log_path, "a") as logf:
        for epoch in range(uc.epochs):
            order = torch.randperm(len(prompts), generator=g).tolist()
            for b in range(0, len(order), uc.micro_batch_size):
                batch = make_batch(model, tok, rm, rm_tok, [prompts[j] for j in order[b : b + uc.micro_batch_size]], dev, ref_model, head, state)
                for _ in range(passes):
                    per_example, metrics = step_loss(cfg, model, ref_model, batch, head, state) if head_fn else step_loss(cfg, model, ref_model, batch)
                    loss = per_example.mean()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    ok, grad_norm = common.apply_step(opt, params, uc.max_grad_norm, loss.item())
                    skipped += not ok
                    step += 1
                    last = common.log_step(logf, {"step": step, "epoch": epoch, "loss": loss.item(), "grad_norm": grad_norm, "skipped": not ok, **metrics})
                    bar.update(1)
                    faults.point(i, "update", step)
    bar.close()
    model.eval()
    with timer("save_s"):
        saved = common.save(model, tok, stage)
        if head is not None:
            torch.save(head.state_dict(), stage.path / "value_head.pt")
    peak = round(progress.peak_rss_mb(), 1)
    return stage.finish(
        rule=str(uc.name), rows_in=len(prompts), saved=saved, reference=reference, steps=step, skipped_steps=skipped,
        final=last, trainable_parameters=sum(p.numel() for p in params), peak_rss_mb=peak, timings=timer.seconds,
    )  # fmt: skip
