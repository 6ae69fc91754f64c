"""Update benchmarks: a DPO step on cached reference log-probs vs one that recomputes them
(time per step side by side, peak RSS each in a process of its own), and the on-policy
rules' update stages side by side on the same model and prompts (seconds per optimiser
step, peak RSS)."""

from __future__ import annotations

import statistics
import time
from functools import partial
from pathlib import Path

import torch

from iterate import progress
from iterate.bench import models as bm
from iterate.bench.config import main_config
from iterate.stages.update import common, dpo, training
from iterate.train import models
from iterate.train.loop import apply_step


def random_pairs(tok, lengths: list[tuple[int, int, int]], seed: int) -> list[common.Example]:
    """Pairs of ordinary tokens drawn at random (seeded), of (prompt, chosen, rejected)
    token counts ``lengths``."""
    g = torch.Generator().manual_seed(seed)
    low = len(tok.all_special_ids) + 1  # ordinary tokens only

    def draw(n: int) -> list[int]:
        return torch.randint(low, len(tok), (n,), generator=g).tolist()

    return [common.Example(draw(p), draw(c), draw(r)) for p, c, r in lengths]


def _examples(tok, spec: dict) -> list[common.Example]:
    shape = (spec["prompt_tokens"], spec["response_tokens"], spec["response_tokens"])
    return random_pairs(tok, [shape] * spec["pairs"], spec["seed"])


class DpoStep:
    """One optimiser step of DPO over ``pairs`` examples, with the reference log-probs
    either cached once (``recompute=False``) or computed again in every step."""

    def __init__(self, spec: dict):
        self.cfg = main_config(
            [
                f"model.path={spec['model']}",
                f"model.dtype={spec.get('dtype', 'float32')}",
                "update=dpo",
                f"update.micro_batch_size={spec['micro_batch_size']}",
            ]
        )
        self.dev = models.device(str(self.cfg.device))
        self.path = spec["model"]
        self.tok = models.load_tokenizer(self.path)
        self.model = common.policy_model(self.cfg, self.path, self.dev)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-5)
        self.examples = _examples(self.tok, spec)
        loss = dpo.loss_fn(self.cfg)
        self.loss_fn = lambda m, b: loss(m, self.tok, b, self.dev)
        self.model.train()

    def reference(self) -> None:
        common.reference_logps(
            self.cfg, self.model, self.tok, self.examples, self.path, self.path, self.dev
        )
        self.model.train()

    def __call__(self, recompute: bool) -> float:
        t = time.perf_counter()
        if recompute:
            self.reference()
        self.opt.zero_grad(set_to_none=True)
        total, _ = training.accumulate(
            self.model, self.examples, self.loss_fn, self.cfg.update.micro_batch_size
        )
        apply_step(self.opt, self.params, 1.0, total)
        return time.perf_counter() - t


def dpo_timing(spec: dict) -> dict:
    """Cached and recomputed steps alternating in one process: the ratio of their medians."""
    step = DpoStep(spec)
    t = time.perf_counter()
    step.reference()  # the cached variant's one-off pass
    reference_once = time.perf_counter() - t
    step(False), step(True)  # warm-up
    times: dict[str, list[float]] = {"cached": [], "recompute": []}
    for _ in range(spec["rounds"]):
        for _ in range(spec["steps"]):
            times["cached"].append(step(False))
            times["recompute"].append(step(True))
    cached, recompute = statistics.median(times["cached"]), statistics.median(times["recompute"])
    return {
        "cached_step_s": cached,
        "recompute_step_s": recompute,
        "ratio": cached / recompute,
        "reference_once_s": reference_once,
        "steps_each": len(times["cached"]),
    }


def dpo_variant(spec: dict) -> dict:
    """One variant alone in this process: its peak RSS (a per-process high-water mark)."""
    base = bm.rss_mb()
    step = DpoStep(spec)
    loaded = bm.rss_mb()
    recompute = spec["variant"] == "recompute"
    if not recompute:
        step.reference()
    times = [step(recompute) for _ in range(spec["steps"])]
    return {
        "variant": spec["variant"],
        "step_s": statistics.median(times),
        "rss_before_model_mb": base,
        "rss_after_load_mb": loaded,
        "peak_rss_mb": progress.peak_rss_mb(),
    }


def rl_stages(spec: dict, wrap=None) -> dict:
    """Real on-policy update stages, one per variant (a name and its overrides of the main
    config: ``update=grpo``, ``update.kl_loss_coef=0.05``), each on a mini run folder of its
    own with the same model, reward and prompts, one after another in this process: they
    share one kept vLLM engine (in this process), so a variant's seconds are its own. Per
    variant: seconds, optimiser steps, seconds per step (its rollouts included, the engine's
    start not), responses rolled out, the sampling share, and this process's peak RSS during
    it (the high-water mark reset before each). ``warmup``: the first variant once more
    before them all, not counted (the engine's start and its first shapes). ``reward``: a
    reward model's folder, or None for the variants' own reward; ``steps`` optimiser steps
    of ``prompts`` prompts each (1 by default), cut into micro-batches of
    ``micro_batch_size`` rows (all a step's prompts' rows by default). ``wrap(name, run)``,
    if given, runs each variant's stage (``run()``: its done record), a profiler around it,
    say."""
    from iterate.sampling import samplers
    from iterate.stages import heldout, prompts
    from iterate.store.paths import Paths
    from iterate.train.rules import rule

    n, steps = spec["prompts"], spec.get("steps", 1)
    micro = spec.get("micro_batch_size", n)
    out: dict = {"rss_before_model_mb": bm.rss_mb(), "variants": {}}
    runs = list(spec["variants"].items())
    if spec["warmup"]:  # the first variant once, not counted: the engine's first shapes
        runs.insert(0, runs[0])
    try:
        for k, (name, overrides) in enumerate(runs):
            cfg = main_config(
                [
                    f"model.path={spec['model']}",
                    "reward.train=false",
                    *([f"reward.path={spec['reward']}"] if spec["reward"] else []),
                    f"prompts.per_iteration={n * steps}",
                    "update.epochs=1",
                    f"update.micro_batch_size={micro}",
                    f"update.grad_accum={n // micro}",
                    f"runs_dir={spec['workdir']}",
                    *overrides,
                ]
            )
            warmup = spec["warmup"] and k == 0
            paths = Paths(
                run=Path(spec["workdir"]) / ("warmup" if warmup else name),
                base_policy=spec["model"],
                reward_model=spec["reward"],
            )
            heldout.prompts(cfg, paths)
            prompts.run(cfg, paths, 0)
            progress.reset_peak_rss()
            t = time.perf_counter()
            run = partial(
                rule(str(cfg.update.name)).run, cfg, paths, 0, spec["model"], spec["model"]
            )
            done = wrap(name, run) if wrap else run()
            seconds = time.perf_counter() - t
            timings = done["timings"]
            if warmup:
                continue
            train_s = timings["train_s"] - timings.get("sampler_engine_start_s", 0.0)
            out["variants"][name] = {
                "rule": str(cfg.update.name),
                "overrides": overrides,
                "seconds": seconds,
                "steps": done["steps"],
                "step_s": train_s / max(1, done["steps"]),  # rollouts included
                "sampling_s": timings.get("sampler_sample_s", 0.0),
                "responses": done["responses"],
                "peak_rss_mb": progress.peak_rss_mb(),
                "trainable_parameters": done["trainable_parameters"],
            }
    finally:
        samplers.close_kept()
    return out


def mixed_lengths(pairs: int, low: int, high: int, seed: int) -> list[tuple[int, int, int]]:
    """(prompt, chosen, rejected) token counts: each sequence of ``low``..``high`` tokens, a
    prompt of an eighth of ``low`` to ``low``, the rejected within 25% of the chosen."""
    g = torch.Generator().manual_seed(seed)

    def uniform(a: float, b: float) -> float:
        return a + (b - a) * torch.rand((), generator=g).item()

    out = []
    for _ in range(pairs):
        total = round(uniform(low, high))
        prompt = round(uniform(max(1, low // 8), low))
        rejected = min(high, max(low, round(total * uniform(0.75, 1.25))))
        out.append((prompt, total - prompt, rejected - prompt))
    return out


def padding_variant(spec: dict) -> dict:
    """One DPO epoch over ``spec["lengths"]`` pairs of random tokens in this process, with
    the variant's overrides, through the one training loop: seconds (the reference pass and
    the training apart), the share of padded tokens among those fed in training (the same
    cut replayed: ``pair_steps`` and ``models.micro_batches``), and the peak RSS."""
    from iterate.store.stage import Stage

    cfg = main_config(
        [
            f"model.path={spec['model']}",
            "update=dpo",
            "update.epochs=1",
            f"update.micro_batch_size={spec['micro_batch_size']}",
            "update.grad_accum=1",
            "update.lora.dropout=0",
            f"seed={spec['seed']}",
            *spec["overrides"],
        ]
    )
    dev, uc = models.device(str(cfg.device)), cfg.update
    tok = models.load_tokenizer(spec["model"])
    model = common.policy_model(cfg, spec["model"], dev)
    examples = random_pairs(tok, spec["lengths"], spec["seed"])
    t = time.perf_counter()
    common.reference_logps(cfg, model, tok, examples, spec["model"], spec["model"], dev)
    reference_s = time.perf_counter() - t
    fed = sum(
        models.padded_tokens(mb)
        for _, step in common.pair_steps(cfg, examples, 0)
        for mb in models.micro_batches(step, uc.micro_batch_size, uc.max_tokens_per_micro_batch)
    )
    real = sum(sum(e.lengths()) for e in examples)
    loss = dpo.loss_fn(cfg)
    total = common.steps_per_epoch(cfg, len(examples))
    stage = Stage(Path(spec["workdir"]) / "update", "update", {})
    t = time.perf_counter()
    done = training.train(
        cfg,
        model,
        training.trainable(model),
        common.pair_steps(cfg, examples, 0),
        total,
        lambda m, b: loss(m, tok, b, dev),
        stage,
        0,
    )
    train_s = time.perf_counter() - t
    return {
        "steps": done["steps"],
        "train_s": train_s,
        "reference_s": reference_s,
        "train_s_per_1k_pairs": 1000 * train_s / len(examples),
        "real_tokens": real,
        "fed_tokens": fed,
        "padding": 1 - real / fed,
        "peak_rss_mb": progress.peak_rss_mb(),
    }
