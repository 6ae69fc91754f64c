"""What the on-policy rules (PPO, ReMax, the group rules) share: rollouts of the policy
under training through the run's sampler, scored by the run's reward, and their batch
source for the one training loop (``training.train``).

Before each rollout, once ``update.sync_every`` optimiser steps have passed since the last
sync, the policy under training is put into the sampler (``Sampler.sync``): with vLLM its
weights, the LoRA adapter merged into a copy, are loaded into the engine in place; with
transformers the live model is sampled. Log-probs (the PPO ratio's old ones included) are
always computed here by the trainer; the sampler's own log-probs of its tokens are kept
only to measure how far they are from the trainer's and, when asked, to correct for it
(``correction``). Each rollout is seeded from (seed, iteration, step), so a crashed update replays
the same rollouts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from iterate import progress, rewards
from iterate.config import Config
from iterate.errors import BadInput
from iterate.rewards import Reward
from iterate.sampling import samplers
from iterate.stages.update import common, training
from iterate.stages.update.common import Example
from iterate.store import seeds
from iterate.store.paths import Paths
from iterate.store.shards import read_shards
from iterate.train import losses, models

log = logging.getLogger(__name__)


@dataclass
class Context:
    """What an on-policy rule's ``prepare`` and ``loss`` work with."""

    cfg: Config
    model: torch.nn.Module  # the policy under training (a peft model with LoRA)
    tok: object
    dev: torch.device
    ref_model: torch.nn.Module | None  # None: the reference is the policy with its adapter disabled
    sampler: samplers.Sampler
    reward: Reward  # what scores the rollouts
    head: torch.nn.Module | None = None  # PPO's value head
    state: dict = field(default_factory=dict)  # PPO's adaptive KL coefficient
    pool: list = field(default_factory=list)  # the iteration's prompts (a group rule's refill)
    counts: dict = field(default_factory=dict)  # what the rollouts left out, over the update

    def rollout(
        self, prompts: list[tuple[str, list[int]]], seed: int, greedy: bool = False, n: int = 1
    ) -> list[Example]:
        """``n`` responses per prompt (sampled in one request, or greedy), scored by the run's
        reward; a prompt's ``n`` examples are consecutive (a group rule's group)."""
        gc = self.cfg.generate
        params = samplers.Params(
            n=n,
            temperature=0.0 if greedy else gc.temperature,
            top_p=gc.top_p,
            max_tokens=gc.max_tokens,
            logprobs=not greedy,  # the sampler's view of its tokens: the mismatch
        )
        got = self.sampler.sample([ids for _, ids in prompts], params, seed)
        flat = [(p, ids, s) for (p, ids), group in zip(prompts, got, strict=True) for s in group]
        scores = self.reward.score(
            [p for p, _, _ in flat], [s.text for _, _, s in flat], desc="rollout reward"
        )
        out = []
        for (_, ids, s), r in zip(flat, scores, strict=True):
            rollout = {"score": r, "stop": s.finish_reason == "stop"}
            if s.logps is not None:
                rollout["sampler_logps"] = torch.tensor(s.logps)
            out.append(Example(ids, list(s.ids), rollout=rollout))
        return out

    def batch(self, examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, attention mask) (B, T) and the response mask (B, T-1), right-padded."""
        return models.sequence_batch(
            self.tok, [e.prompt for e in examples], [e.chosen for e in examples], self.dev
        )

    @torch.no_grad()
    def ref_logps(self, ids: torch.Tensor, mask: torch.Tensor, resp: torch.Tensor) -> torch.Tensor:
        """Reference log-probs (B, T-1): the frozen reference model when there is one, else the
        policy with its LoRA adapter disabled (no second copy)."""
        with models.reference_of(self.model, self.ref_model) as ref:
            return models.token_logps(ref, ids, mask) * resp


def correction(
    ctx: Context, trainer: torch.Tensor, mb: list[Example], resp: torch.Tensor
) -> tuple[torch.Tensor, dict]:
    """Per-token weights (B, T-1) for a rule's policy-gradient losses, correcting for the
    sampler/trainer mismatch (``update.rollout_correction``, ``losses.rollout_weights``;
    ``resp`` itself when there is nothing to correct), and the mismatch itself: the mean k3
    of KL(sampler || trainer) per token, the largest ratio either way and the share of tokens
    past ``tis_cap`` in the micro-batch.
    ``trainer``: the trainer's log-probs of the rollout's tokens as it was when it rolled
    out (PPO's old log-probs; the current ones, detached, for one pass)."""
    if any("sampler_logps" not in e.rollout for e in mb):
        return resp, {}
    uc = ctx.cfg.update
    sampler = grid([e.rollout["sampler_logps"] for e in mb], resp)
    k3, worst, past = losses.mismatch(trainer, sampler, resp, uc.tis_cap)
    w = losses.rollout_weights(trainer, sampler, resp, str(uc.rollout_correction), uc.tis_cap)
    return w, {"mismatch_k3": k3, "mismatch_max_ratio": worst, "mismatch_past_cap": past}


def aggregate(ctx: Context, per_token: torch.Tensor, mb: list[Example], resp) -> torch.Tensor:
    """Per-token losses to per-example ones as ``update.loss_agg`` says: ``token_mean`` over
    all the optimiser step's tokens, whatever micro-batch these examples are (the step's mean
    response length, ``rollout_steps``), ``sequence_mean`` over the step's responses in the
    loss (one that ``mask_truncated`` leaves out is no part of the mean: the step's share
    of responses in the loss, ``rollout_steps``), ``token_sum_norm`` over
    ``generate.max_tokens``."""
    how = str(ctx.cfg.update.loss_agg)
    out = losses.aggregate(
        per_token,
        resp,
        how,
        norm=ctx.cfg.generate.max_tokens,
        mean_tokens=mb[0].rollout.get("step_mean_tokens"),
    )
    share = mb[0].rollout.get("step_in_loss_share") or 1.0
    return out / share if how == "sequence_mean" else out


def grid(values: list[torch.Tensor], resp: torch.Tensor) -> torch.Tensor:
    """Per-response 1-D tensors placed on the (B, T-1) response positions of ``resp``."""
    out = torch.zeros_like(resp)
    out[resp.bool()] = torch.cat(values).to(out)
    return out


def rows(x: torch.Tensor, resp: torch.Tensor) -> list[torch.Tensor]:
    """The inverse of ``grid``: each row's values on its response positions."""
    return [x[b][resp[b].bool()].detach() for b in range(x.shape[0])]


def token_mean(x: torch.Tensor, resp: torch.Tensor) -> float:
    """The mean of ``x`` over response tokens (``resp`` 1 on them), a float for the log; of
    ``-logps``, the policy's entropy estimated on its own sampled tokens."""
    return ((x.detach() * resp).sum() / resp.sum().clamp(min=1)).item()


def micro_batches(ctx: Context, examples: list[Example]) -> list[list[Example]]:
    """The micro-batches of a rollout's forward passes without gradients, cut as the
    training loop cuts a step (``models.micro_batches``)."""
    uc = ctx.cfg.update
    return models.micro_batches(examples, uc.micro_batch_size, uc.max_tokens_per_micro_batch)


def prompt_list(cfg: Config, paths: Paths, i: int, tok) -> list[tuple[str, list[int]]]:
    """The iteration's prompts (text, chat-template ids) that leave room for the response."""
    limit = cfg.model.max_length - cfg.generate.max_tokens
    table = read_shards(paths.stage(i, "prompts"))
    out = [(t, models.prompt_ids(tok, t)) for t in table["prompt"].to_pylist()]
    return [(t, ids) for t, ids in out if len(ids) <= limit]


Prompts = list[tuple[str, list[int]]]


@dataclass(frozen=True)
class OnPolicy:
    """What an on-policy update rule adds to the shared rollout loop: how
    it turns a step's prompts into examples (``prepare(ctx, prompts, seed)``: rollouts and
    everything computed from them without gradients), its loss on a micro-batch
    (``loss(ctx, model, examples) -> (per-example losses, metrics)``), the optimiser steps per
    rollout (``passes``), and PPO's value head (``new_head(cfg, model)``)."""

    prepare: Callable[[Context, Prompts, int], list[Example]]
    loss: Callable
    passes: Callable[[Config], int] = lambda cfg: 1
    new_head: Callable | None = None


def rollout_steps(
    ctx: Context, prompts: Prompts, i: int, prepare: Callable, passes: int, policy: str, stats: dict
) -> Iterator[training.Step]:
    """The on-policy batch source: per ``micro_batch_size x grad_accum`` prompts, sync the
    policy into the sampler (every ``sync_every`` steps), roll out and prepare the step's
    examples (``prepare``, no gradients), then yield them for ``passes`` optimiser steps."""
    cfg, uc = ctx.cfg, ctx.cfg.update
    g = torch.Generator().manual_seed(seeds.derive("update", cfg.seed, i))
    per_step = uc.micro_batch_size * uc.grad_accum
    step, synced = 0, None
    for epoch in range(uc.epochs):
        order = torch.randperm(len(prompts), generator=g).tolist()
        for b in range(0, len(order), per_step):
            ctx.model.eval()
            if synced is None or step - synced >= uc.sync_every:
                ctx.sampler.sync(ctx.model, ctx.tok, policy)
                synced = step
            with torch.no_grad():
                examples = prepare(
                    ctx,
                    [prompts[j] for j in order[b : b + per_step]],
                    seeds.derive("rollout", cfg.seed, i, step),
                )
            kept = [e for e in examples if e.rollout.get("in_loss", True)]
            in_loss = sum(len(e.chosen) for e in kept)
            for e in examples:  # what a token (or sequence) mean over the whole step divides by
                e.rollout["step_mean_tokens"] = max(1, in_loss) / len(examples)
                e.rollout["step_in_loss_share"] = len(kept) / len(examples)
                stats.setdefault("scores", []).append(e.rollout["score"])
                stats.setdefault("stops", []).append(e.rollout["stop"])
                stats.setdefault("tokens", []).append(len(e.chosen))
            for _ in range(passes):
                yield epoch, examples
                step += 1


def _mean(xs: list) -> float | None:
    return round(sum(xs) / len(xs), 4) if xs else None


def left_out(cfg: Config, paths: Paths, i: int, result: dict, counts: dict) -> None:
    """Say what the update learned from: a step whose rollouts were all left out (a group
    rule's groups of equal rewards with ``drop_equal_groups``, rewards that are not finite
    numbers) took no optimiser step and is counted; an update where that was every step saw
    no data, and its policy is not handed off as an update: ``BadInput`` naming why."""
    empty, steps = result["empty_steps"], result["steps"]
    if not empty:
        return
    why = ", ".join(
        f"{counts[k]} {k.replace('_', ' ')}"
        for k in ("equal_groups", "unscored_groups")
        if counts.get(k)
    )
    said = f"{empty} of {steps} steps had no rollout to learn from" + (
        f" (of {counts['groups']} groups: {why})" if why else ""
    )
    if empty < steps:
        log.warning("iter %d update: %s: no optimiser step for them", i, said)
        return
    fix = (
        (
            " update.drop_equal_groups=true leaves out a group whose rewards are all equal:"
            " the reward gives every response of a prompt the same score"
        )
        if counts.get("equal_groups")
        else ""
    )
    raise BadInput(
        f"{paths.stage(i, 'update')}: the update saw no data: {said}.{fix} A reward must tell "
        f"the responses of a prompt apart (and be a finite number) for {cfg.update.name} to learn"
    )


def run_on_policy(
    cfg: Config,
    paths: Paths,
    i: int,
    policy: str,
    reference: str,
    rule: OnPolicy,
    head_init: str | None = None,
) -> dict:
    """An on-policy rule's update stage; ``head_init``: a saved value head to start from."""
    gc = cfg.generate
    dev = models.device(str(cfg.device))
    reward = rewards.of(cfg, path=paths.reward_model, device=dev, run=paths.run)
    rollout = {
        "backend": str(gc.backend),
        "temperature": gc.temperature,
        "top_p": gc.top_p,
        "max_tokens": gc.max_tokens,
        "reward": reward.identity(),
        "value_head_init": head_init,
    }
    stage = common.stage_for(
        cfg, paths, i, policy, reference, ("prompts",), {"rollout": rollout}, reward.inputs()
    )
    if stage.check(cfg.force):
        return stage.read_done()
    dev, tok, timer = common.start(cfg, i, policy)
    with timer("load_s"):
        model = common.policy_model(cfg, policy, dev)
        lora = hasattr(model, "disable_adapter")
        ref_model = (
            None
            if (reference == policy and lora)
            else models.load_policy(reference, str(cfg.model.dtype), dev)
        )
        reward = reward.on(dev)
    head = rule.new_head(cfg, model).to(dev) if rule.new_head else None
    if head is not None and head_init:
        head.load_state_dict(torch.load(head_init, map_location=dev))
    prompts = prompt_list(cfg, paths, i, tok)
    if not prompts:
        raise BadInput(
            f"{paths.stage(i, 'prompts')}: no prompt leaves room for "
            "generate.max_tokens within model.max_length"
        )
    stats: dict = {}
    with samplers.session(cfg) as sampler, timer("train_s"):
        ctx = Context(
            cfg,
            model,
            tok,
            dev,
            ref_model,
            sampler,
            reward,
            head,
            {"kl_coef": cfg.update.kl_coef},
            prompts,
        )
        passes = rule.passes(cfg)
        total = cfg.update.epochs * common.steps_per_epoch(cfg, len(prompts)) * passes
        source = rollout_steps(ctx, prompts, i, rule.prepare, passes, policy, stats)
        params = training.trainable(model, *([head] if head is not None else []))
        result = training.train(
            cfg, model, params, source, total, lambda m, b: rule.loss(ctx, m, b), stage, i
        )
        timings = sampler.timings
    left_out(cfg, paths, i, result, ctx.counts)
    with timer("save_s"):
        saved = common.save(model, tok, paths, i)
        if head is not None:
            torch.save(head.state_dict(), paths.value_head(i))
    scores = stats.get("scores", [])
    return stage.finish(
        rule=str(cfg.update.name),
        rows_in=len(prompts),
        saved=saved,
        reference=reference,
        **result,
        responses=len(scores),
        reward_mean=_mean(scores),
        eos_rate=_mean(stats.get("stops", [])),
        response_tokens_mean=_mean(stats.get("tokens", [])),
        value_head_init=head_init,
        trainable_parameters=training.len_params(params),
        **({"rollout_groups": ctx.counts} if ctx.counts else {}),
        peak_rss_mb=round(progress.peak_rss_mb(), 1),
        timings={**timer.seconds, **{f"sampler_{k}": v for k, v in timings.items()}},
    )
