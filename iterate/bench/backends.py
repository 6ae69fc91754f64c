"""Where the sampler backend matters beyond best-of-n: a PPO update stage (rollouts every
step) and the held-out evaluation stage, each run with ``generate.backend=vllm`` and
``=transformers`` on the same model, prompts and reward model, alternating rounds in one
process (a warm-up round first, so the kept engine's start is not counted). And how the
policy under training reaches vLLM: its merged weights loaded in place (what ``Sampler.sync``
does) vs its LoRA adapter served by id (vLLM's ``enable_lora``), each in its own process.
"""

from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path

import torch

from iterate.bench import models as bm
from iterate.bench.config import main_config
from iterate.sampling import samplers
from iterate.stages import evaluate, heldout, prompts
from iterate.stages.update import ppo
from iterate.store.paths import Paths
from iterate.train import models

BACKENDS = ("vllm", "transformers")


def _cfg(spec: dict, backend: str, work: Path):
    return main_config(
        [
            f"model.path={spec['model']}",
            "update=ppo",
            "reward.train=false",
            f"reward.path={spec['reward']}",
            f"prompts.per_iteration={spec['prompts']}",
            f"prompts.heldout={spec['prompts']}",
            "update.epochs=1",
            f"update.micro_batch_size={spec['micro_batch_size']}",
            "update.ppo_epochs=1",
            f"generate={backend}",
            f"generate.max_tokens={spec['max_tokens']}",
            f"evaluate.samples={spec['samples']}",
            f"runs_dir={work}",
        ]
    )


def _adapter(cfg, policy: str, out: Path) -> None:
    """A LoRA adapter with non-zero weights: the 'updated' policy the evaluation samples."""
    from iterate.stages.update import common

    model = common.policy_model(cfg, policy, torch.device("cpu"))
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    model.save_pretrained(out)


def _stage(kind: str, cfg, paths: Paths, policy: str) -> dict:
    if kind == "rollouts":
        return ppo.run(cfg, paths, 0, policy, policy)
    return evaluate.run(cfg, paths, 0, policy, policy)


def measure(spec: dict) -> dict:
    """``kind`` rollouts: seconds per PPO optimiser step (a rollout of ``micro_batch_size``
    prompts, scoring, the PPO pass); ``kind`` evaluation: seconds per evaluate stage."""
    kind, work, policy = spec["kind"], Path(spec["workdir"]), spec["model"]
    runs = {}
    for b in BACKENDS:
        cfg = _cfg(spec, b, work)
        paths = Paths(run=work / kind / b, base_policy=policy, reward_model=spec["reward"])
        shutil.rmtree(paths.run, ignore_errors=True)
        heldout.prompts(cfg, paths)
        prompts.run(cfg, paths, 0)
        if kind == "evaluation":
            _adapter(cfg, policy, paths.stage(0, "update") / "adapter")
            heldout.initial_samples(cfg, paths)  # the win rate's baseline: not part of the stage
        runs[b] = (cfg, paths)
    folder = "update" if kind == "rollouts" else "evaluate"
    times: dict[str, list[float]] = {b: [] for b in BACKENDS}
    details: dict[str, list[dict]] = {b: [] for b in BACKENDS}
    try:
        for r in range(spec["rounds"] + 1):  # round 0 warms up (the kept engine starts there)
            for b, (cfg, paths) in runs.items():
                shutil.rmtree(paths.stage(0, folder), ignore_errors=True)
                if kind == "evaluation":
                    _adapter(cfg, policy, paths.stage(0, "update") / "adapter")
                t = time.perf_counter()
                done = _stage(kind, cfg, paths, policy)
                seconds = time.perf_counter() - t
                if (
                    r
                ):  # a PPO step: rollout, scoring, the pass (not the stage's model load and save)
                    times[b].append(
                        done["timings"]["train_s"] / done["steps"]
                        if kind == "rollouts"
                        else seconds
                    )
                    details[b].append(done.get("timings", {}))
    finally:
        samplers.close_kept()
    out = {
        "kind": kind,
        "unit": "s/step" if kind == "rollouts" else "s/stage",
        "rounds": spec["rounds"],
    }
    for b in BACKENDS:
        out[f"{b}_s"] = statistics.median(times[b])
        out[f"{b}_timings"] = details[b][-1]
    out["transformers_over_vllm"] = out["transformers_s"] / out["vllm_s"]
    return out


def _merged_sync(spec: dict, model, tok, prompts: list, cfg) -> tuple:
    """(push, draw, close) through the run's sampler: merged weights loaded in place."""
    policy = spec["model"]
    sampler = samplers.VllmSampler(
        samplers.Spec(
            max_length=bm.max_length(policy),
            gpu_memory_utilization=spec["gpu_memory_utilization"],
        )
    )
    sampler.load(policy)
    params = samplers.Params(
        n=spec["n"], temperature=1.0, max_tokens=spec["new_tokens"], ignore_eos=True
    )
    return (
        lambda k: sampler.sync(model, tok, policy),
        lambda seed: sampler.sample(prompts, params, seed),
        sampler.close,
    )


def _lora_sync(spec: dict, model, tok, prompts: list, cfg) -> tuple:
    """(push, draw, close) for the alternative: vLLM in this process, the adapter saved and
    read by a new id (``enable_lora``)."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    llm = LLM(
        model=spec["model"],
        dtype="float32",
        max_model_len=bm.max_length(spec["model"]),
        gpu_memory_utilization=spec["gpu_memory_utilization"],
        enforce_eager=True,
        enable_lora=True,
        max_lora_rank=cfg.update.lora.r,
        max_loras=1,
    )
    folder = Path(spec["workdir"]) / "sync_adapter"
    request: list = [None]
    new = spec["new_tokens"]
    sp = SamplingParams(
        n=spec["n"], temperature=1.0, max_tokens=new, min_tokens=new, ignore_eos=True
    )

    def push(k: int) -> None:
        model.save_pretrained(folder)
        request[0] = LoRARequest(f"step-{k}", k + 1, str(folder))
        # the first request with a new id reads the adapter
        first = [{"prompt_token_ids": prompts[0]}]
        llm.generate(first, SamplingParams(max_tokens=1), lora_request=request[0], use_tqdm=False)

    def draw(seed: int) -> None:
        batch = [{"prompt_token_ids": p} for p in prompts]
        llm.generate(batch, sp, lora_request=request[0], use_tqdm=False)

    return push, draw, lambda: None


def sync_variant(spec: dict) -> dict:
    """Sync the same LoRA-adapted policy ``syncs`` times and sample after each, one way:
    ``merged`` (``VllmSampler.sync``: merged weights loaded in place) or ``lora`` (the
    adapter saved and served by a new id; vLLM started with ``enable_lora``). Seconds per
    sync and tokens/s of the sampling after it."""
    from iterate.stages.update import common

    policy = spec["model"]
    cfg = main_config([f"model.path={policy}", "update.lora.dropout=0.0"])
    tok = models.load_tokenizer(policy)
    model = common.policy_model(cfg, policy, torch.device("cpu"))
    torch.manual_seed(0)
    prompts = [models.prompt_ids(tok, p) for p in spec["texts"]]
    way = _merged_sync if spec["variant"] == "merged" else _lora_sync
    push, draw, close = way(spec, model, tok, prompts, cfg)
    tokens = len(prompts) * spec["n"] * spec["new_tokens"]
    sync_s, tps = [], []
    try:
        for k in range(spec["syncs"] + 1):  # the first round warms up (start, first load)
            with torch.no_grad():
                for n, p in model.named_parameters():  # a step's worth of change to the adapter
                    if "lora_B" in n:
                        p.add_(torch.randn_like(p) * 0.01)
            t = time.perf_counter()
            push(k)
            pushed = time.perf_counter()
            draw(k)
            if k:
                sync_s.append(pushed - t)
                tps.append(tokens / (time.perf_counter() - pushed))
    finally:
        close()
    return {
        "variant": spec["variant"],
        "sync_s": statistics.median(sync_s),
        "tokens_per_s": statistics.median(tps),
        "syncs": spec["syncs"],
    }
