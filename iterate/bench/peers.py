"""The peers section: the engine's DPO and GRPO steps against TRL's trainers on the same
model, data, LoRA adapter, batch and lengths, each a process of its own (``child.run``).

- DPO: ``pairs`` random-token pairs per optimiser step in micro-batches of
  ``micro_batch_size``, the reference log-probs computed once before training in both
  (TRL's ``precompute_ref_log_probs``); the engine's step is ``update.DpoStep``.
- GRPO: ``prompts`` toy prompts x ``group_size`` samples of at most ``new_tokens`` tokens,
  no KL term (no reference pass), one optimiser step per rollout, micro-batches of
  ``micro_batch_size`` responses, both scored by ``reward`` below; the engine's is its real
  update stage (``update.rl_stages``: vLLM or the transformers sampler), TRL's samples with
  transformers' ``generate``.

A step's time is the median over ``steps`` steps after ``warmup`` steps not counted; for
TRL the wall time between one optimiser step's end and the next (its data collation,
generation and logging included, as they are in the engine's)."""

from __future__ import annotations

import statistics
import time

import torch

from iterate.train import models


def reward(
    prompts: list, responses: list | None = None, completions: list | None = None, **_
) -> list[float]:
    """The peers' shared reward, cheap and the same for both engines (the engine calls it
    with ``responses``, TRL with ``completions``): the share of distinct words."""
    out = []
    for r in responses if responses is not None else completions:
        words = r.split()
        out.append(len(set(words)) / (1 + len(words)))
    return out


def lora():
    """The adapter both engines train: the engine's default (r 16, alpha 32, dropout 0.05 on
    q_proj and v_proj)."""
    from peft import LoraConfig

    return LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        target_modules=["q_proj", "v_proj"],
        task_type="CAUSAL_LM",
    )


def _step_clock():
    """A trainer callback that records the wall time of each optimiser step's end."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_train_begin(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())

    return Clock()


def _steps(ends: list[float], warmup: int) -> list[float]:
    return [b - a for a, b in zip(ends, ends[1:])][warmup:]


def _trl_args(spec: dict, out: str, **kw) -> dict:
    """The settings both TRL trainers share: CPU, the model's dtype (bf16: autocast, as
    ours), no logging or saving, a constant
    learning rate, the engine's clipping and seed."""
    return dict(
        output_dir=out,
        use_cpu=True,
        bf16=False,
        fp16=False,
        report_to=[],
        save_strategy="no",
        logging_steps=10**6,
        disable_tqdm=True,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        weight_decay=0.0,
        learning_rate=1e-5,
        seed=spec["seed"],
        max_steps=spec["warmup"] + spec["steps"],
        dataloader_num_workers=0,
        remove_unused_columns=False,
        **kw,
    )


def trl_dpo(spec: dict) -> dict:
    """TRL's DPOTrainer on the engine's random pairs, already tokenized (its dataset
    preparation skipped: the ids go in as they are)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from iterate.bench.update import random_pairs

    tok = models.load_tokenizer(spec["model"])
    shape = (spec["prompt_tokens"], spec["response_tokens"], spec["response_tokens"])
    total = spec["pairs"] * (spec["warmup"] + spec["steps"])
    pairs = random_pairs(tok, [shape] * total, spec["seed"])
    data = Dataset.from_list(
        [
            {"prompt_ids": e.prompt, "chosen_ids": e.chosen, "rejected_ids": e.rejected}
            for e in pairs
        ]
    )

    class Tokenized(DPOTrainer):
        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset

    micro = spec["micro_batch_size"]
    args = DPOConfig(
        **_trl_args(
            spec,
            spec["workdir"],
            per_device_train_batch_size=micro,
            gradient_accumulation_steps=spec["pairs"] // micro,
            beta=0.1,
            max_length=None,
            precompute_ref_log_probs=True,
            precompute_ref_batch_size=micro,
        )
    )
    return _trained(Tokenized, spec, args, data, tok)


def trl_grpo(spec: dict) -> dict:
    """TRL's GRPOTrainer on the engine's prompts (the chat template applied here, as the
    engine does), transformers' ``generate``, no KL term."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from iterate.toy import world

    tok = models.load_tokenizer(spec["model"])
    total = spec["prompts"] * (spec["warmup"] + spec["steps"])
    texts = [i.prompt for i in world.INSTRUCTIONS][:total]
    texts = [tok.decode(models.prompt_ids(tok, t)) for t in texts]
    n, micro = spec["group_size"], spec["micro_batch_size"]
    args = GRPOConfig(
        **_trl_args(
            spec,
            spec["workdir"],
            per_device_train_batch_size=micro,
            gradient_accumulation_steps=spec["prompts"] * n // micro,
            num_generations=n,
            max_completion_length=spec["new_tokens"],
            beta=0.0,
            temperature=1.0,
            top_p=1.0,
            use_vllm=False,
            num_iterations=1,
            shuffle_dataset=False,
        )
    )
    data = Dataset.from_list([{"prompt": t} for t in texts])
    return _trained(GRPOTrainer, spec, args, data, tok, reward_funcs=reward)


def _trained(trainer_cls, spec: dict, args, data, tok, **kw) -> dict:
    """A TRL trainer on the spec's model with the peers' adapter, trained for its steps:
    the median step time after the warm-up (``_timed``)."""
    clock = _step_clock()
    model = models.load_policy(spec["model"], spec["dtype"])
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=data,
        processing_class=tok,
        peft_config=lora(),
        callbacks=[clock],
        **kw,
    )
    trainer.train()
    return _timed(_steps(clock.ends, spec["warmup"]))


def _timed(times: list[float]) -> dict:
    return {"step_s": statistics.median(times), "steps": len(times), "times": times}


def engine_dpo(spec: dict) -> dict:
    """The engine's DPO step (``update.DpoStep``) with the reference cached; with
    ``profile``, one more step under the profiler (``profiled``)."""
    from iterate.bench.update import DpoStep

    step = DpoStep(spec)
    step.reference()
    for _ in range(spec["warmup"]):
        step(False)
    out = _timed([step(False) for _ in range(spec["steps"])])
    if spec.get("profile"):
        out["profile"] = rates(profiled(lambda: step(False), spec), out["step_s"], 1, spec)
    return out


def profiled(run, spec: dict) -> dict:
    """``run()`` under ``torch.profiler``: the ``top`` operators by self CPU time (their
    share, calls, seconds and FLOPs as the profiler counts them: matmuls and convolutions)
    and the FLOPs of all."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        run()
    events = prof.key_averages()
    total_us = sum(e.self_cpu_time_total for e in events)
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[: spec["top"]]
    return {
        "operators": [
            {
                "name": e.key,
                "share": e.self_cpu_time_total / total_us,
                "calls": e.count,
                "self_s": e.self_cpu_time_total / 1e6,
                "gflop": e.flops / 1e9,
            }
            for e in top
        ],
        "gflop": sum(e.flops for e in events) / 1e9,
    }


def rates(prof: dict, step_s: float, steps: int, spec: dict) -> dict:
    """A profile of ``steps`` optimiser steps with the FLOP rate they reach at ``step_s`` a
    step (measured without the profiler, whose own overhead is left out) against the matmul
    rate (a ``matmul_size`` square GEMM) measured here now in the step's dtype."""
    from iterate.bench import models as bm

    matmul = bm.matmul_rate(models.DTYPES[spec["dtype"]], spec["matmul_size"]) / 1e9
    achieved = prof["gflop"] / steps / step_s
    return {
        **prof,
        "step_gflop": prof["gflop"] / steps,
        "achieved_gflops": achieved,
        "matmul_gflops": matmul,
        "share_of_matmul_rate": achieved / matmul,
    }


def engine_grpo(spec: dict) -> dict:
    """The engine's GRPO update stage on ``steps`` steps' prompts (``update.rl_stages``,
    its warm-up run first): seconds per optimiser step, rollouts included."""
    from iterate.bench.update import rl_stages

    n = spec["group_size"]
    overrides = [
        "update=grpo",
        "update.kl_loss_coef=0",
        f"update.group_size={n}",
        "update.lr=1e-5",
        "reward=correct",
        "reward.name=peers",
        f"reward.function={__name__}:reward",
        f"generate.backend={spec['backend']}",
        f"generate.max_tokens={spec['new_tokens']}",
        "update.lora.target_modules=[q_proj,v_proj]",
        f"model.dtype={spec['dtype']}",
    ]
    variants = {"grpo": overrides, **({"profiled": overrides} if spec.get("profile") else {})}
    profiles: dict = {}

    def wrap(name: str, run):
        if name != "profiled":
            return run()
        done: dict = {}
        profiles[name] = profiled(lambda: done.update(run()), spec)
        return done

    res = rl_stages(
        {
            "model": spec["model"],
            "reward": None,
            "prompts": spec["prompts"],
            "steps": spec["steps"],
            "micro_batch_size": spec["micro_batch_size"],
            "variants": variants,
            "warmup": spec["warmup"] > 0,
            "workdir": spec["workdir"],
        },
        wrap,
    )["variants"]
    out = {"step_s": res["grpo"]["step_s"], "steps": res["grpo"]["steps"]}
    if profiles:
        out["profile"] = rates(profiles["profiled"], out["step_s"], out["steps"], spec)
    return out


RUNNERS = {
    ("iterate", "dpo"): engine_dpo,
    ("trl", "dpo"): trl_dpo,
    ("iterate", "grpo"): engine_grpo,
    ("trl", "grpo"): trl_grpo,
}


def measure(spec: dict) -> dict:
    """One engine's one step kind, in this process: ``RUNNERS``."""
    torch.manual_seed(spec["seed"])
    return RUNNERS[spec["engine"], spec["step"]](spec)
