"""One node's cores as one worker or as several: the same work (best-of-n generation of
sharded prompts; a DPO update stage) on 1 worker x T threads against T workers x 1 thread,
alternating rounds in one process (a warm-up round first: engine starts are not counted).

Generation goes through ``samplers.write_shards`` with one vLLM engine bound to all T cores
against T engines bound to one core each (``workers.engine_env``); the update through the
DPO stage with ``update.num_processes`` 1 (T torch threads) against T (one thread per rank,
gloo all-reduce, ``accelerate launch`` included in the stage's wall time)."""

from __future__ import annotations

import random
import shutil
import statistics
import time
from pathlib import Path

import pyarrow as pa
import torch

from iterate import workers
from iterate.bench import models as bm
from iterate.bench.config import main_config
from iterate.sampling import samplers
from iterate.stages.update import dpo
from iterate.store.paths import Paths
from iterate.store.shards import SCHEMAS, shard_path, write_shard
from iterate.store.stage import Stage
from iterate.toy import world
from iterate.train import models


def _generation(spec: dict, work: Path) -> dict:
    t = spec["threads"]
    tok = models.load_tokenizer(spec["model"])
    texts = [i.prompt for i in world.INSTRUCTIONS][: spec["prompts"]]
    ids = [models.prompt_ids(tok, p) for p in texts]
    size = max(1, len(ids) // spec["shards"])
    todo = {
        k: [(str(j), texts[j], ids[j]) for j in range(s, min(s + size, len(ids)))]
        for k, s in enumerate(range(0, len(ids), size))
    }
    params = samplers.Params(n=spec["n"], max_tokens=spec["new_tokens"], ignore_eos=True)
    sspec = samplers.Spec(max_length=bm.max_length(spec["model"]), gpu_memory_utilization=0.2)
    layouts = {
        f"1x{t}": [workers.engine_env(0, 1, t, 1, cuda=False)],
        f"{t}x1": [workers.engine_env(w, t, 1, 1, cuda=False) for w in range(t)],
    }
    engines = {name: samplers.VllmSampler(sspec, envs) for name, envs in layouts.items()}
    rates: dict[str, list[float]] = {name: [] for name in layouts}
    try:
        for s in engines.values():
            s.load(spec["model"])
        for r in range(0 if spec["warmup"] else 1, spec["rounds"] + 1):  # 0 starts engines
            for name, s in engines.items():
                out = work / "generate" / name
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir(parents=True)
                t0 = time.perf_counter()
                samplers.write_shards(
                    s, todo, params, lambda k, r=r: k + r, out, (-1, "bench"), name
                )
                if r:
                    tokens = len(ids) * spec["n"] * spec["new_tokens"]
                    rates[name].append(tokens / (time.perf_counter() - t0))
    finally:
        for s in engines.values():
            s.close()
    res = {f"{name}_tokens_per_s": statistics.median(v) for name, v in rates.items()}
    res["ratio"] = res[f"{t}x1_tokens_per_s"] / res[f"1x{t}_tokens_per_s"]
    return res


def _pairs(run: Path, tok, n: int, length: int, seed: int) -> None:
    rng = random.Random(seed)
    texts = [i.prompt for i in world.INSTRUCTIONS][:n]
    vocab = len(tok) - 1
    rows = [
        {
            "prompt_id": str(k),
            "prompt": p,
            "chosen": "",
            "rejected": "",
            "chosen_idx": 0,
            "rejected_idx": 1,
            "chosen_reward": 1.0,
            "rejected_reward": 0.0,
            "chosen_ids": [rng.randrange(3, vocab) for _ in range(length)],
            "rejected_ids": [rng.randrange(3, vocab) for _ in range(length)],
        }
        for k, p in enumerate(texts)
    ]
    stage = Stage(run / "iter_000" / "pairs", "pairs", {})
    write_shard(pa.Table.from_pylist(rows, schema=SCHEMAS["pairs"]), shard_path(stage.path, 0))
    stage.finish(rows_out=len(rows))


def _update(spec: dict, work: Path) -> dict:
    t = spec["threads"]
    policy = spec["model"]
    tok = models.load_tokenizer(policy)
    torch.set_num_threads(t)
    res: dict[str, list] = {}
    for r in range(0 if spec["warmup"] else 1, spec["rounds"] + 1):
        for procs in (1, t):
            name = f"{procs}x{t // procs}"
            cfg = main_config(
                [
                    f"model.path={policy}",
                    "update=dpo",
                    "update.epochs=1",
                    f"update.micro_batch_size={spec['micro_batch_size']}",
                    f"update.num_processes={procs}",
                    "update.lora.dropout=0",
                    "device=cpu",
                ]
            )
            run = work / "update" / name
            shutil.rmtree(run, ignore_errors=True)
            _pairs(run, tok, spec["pairs"], spec["response_tokens"], spec["seed"])
            t0 = time.perf_counter()
            done = dpo.run(cfg, Paths(run=run, base_policy=policy), 0, policy, policy)
            wall = time.perf_counter() - t0
            if r:  # round 0 warms up
                res.setdefault(name, []).append((wall, done["timings"]["train_s"] / done["steps"]))
    out = {}
    for name, v in res.items():
        out[f"{name}_stage_s"] = statistics.median(w for w, _ in v)
        out[f"{name}_step_s"] = statistics.median(s for _, s in v)
    out["step_ratio"] = out[f"1x{t}_step_s"] / out[f"{t}x1_step_s"]
    out["stage_ratio"] = out[f"1x{t}_stage_s"] / out[f"{t}x1_stage_s"]
    return out


def measure(spec: dict) -> dict:
    work = Path(spec["workdir"])
    return {
        "threads": spec["threads"],
        "generation": _generation(spec, work),
        "update": _update(spec, work),
    }
