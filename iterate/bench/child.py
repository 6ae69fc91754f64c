"""Measurements that need a process of their own: ``python -m iterate.bench.child KIND
SPEC.json OUT.json``. A vLLM engine per model and dtype (``generation``); peak RSS, a
high-water mark per process, of one DPO variant (``dpo``) or of each on-policy update
stage (``rl``); vLLM vs transformers sampling inside a PPO update or the held-out evaluation
(``backends``); one way of syncing weights into vLLM (``sync``); a DPO epoch over pairs of
mixed lengths (``padding``); one engine's DPO or GRPO step, ours or TRL's (``peers``)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from iterate.bench import models as bm
from iterate.store.shards import read_json

INLINE = False  # the smoke test (--quick): measurements in this process (``run``)


def run(kind: str, spec: dict, workdir: Path) -> dict:
    """Run a measurement in a child process and return its results; with ``INLINE`` (the
    quick smoke test, where imports would take most of the time) in this process, the spec
    through JSON as a child gets it (its peak memory then the whole run's)."""
    import os

    from iterate.workers import kill_with_parent

    workdir.mkdir(parents=True, exist_ok=True)
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_LOGGING_LEVEL": "ERROR", **os.environ}
    if INLINE:
        os.environ.update(env)
        return KINDS[kind](json.loads(json.dumps(spec)))
    spec_path, out_path = workdir / f"{kind}_spec.json", workdir / f"{kind}_out.json"
    spec_path.write_text(json.dumps(spec))
    out_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "iterate.bench.child", kind, str(spec_path), str(out_path)]
    proc = subprocess.run(cmd, env=env, preexec_fn=kill_with_parent)
    if proc.returncode != 0 or not out_path.exists():
        raise RuntimeError(f"bench {kind} child failed (exit {proc.returncode}); spec: {spec_path}")
    return read_json(out_path, must_exist=True)


def generation(spec: dict) -> dict:
    """vLLM and transformers through the run's samplers (``iterate.sampling.samplers``) on the same
    model, prompts and sampling, alternating rounds, with the matmul rate measured between."""
    from iterate.sampling import samplers
    from iterate.train import models

    dtype = models.DTYPES[spec["dtype"]]
    n, new, prompts = spec["n"], spec["new_tokens"], spec["prompts"]
    out: dict = {"rounds": {b: [] for b in spec["backends"]} | {"matmul_flops": []}}
    sampler_spec = samplers.Spec(
        dtype=spec["dtype"],
        max_length=bm.max_length(spec["model"]),
        gpu_memory_utilization=spec["gpu_memory_utilization"],
        enforce_eager=spec["enforce_eager"],
        batch_size=len(prompts),
    )
    params = samplers.Params(n=n, temperature=1.0, top_p=1.0, max_tokens=new, ignore_eos=True)
    by_backend = {b: samplers.make(b, sampler_spec) for b in spec["backends"]}
    try:
        for s in by_backend.values():
            s.load(spec["model"])
        if "vllm" in by_backend:
            t = time.perf_counter()
            by_backend["vllm"].sample(prompts[:1], params, seed=0)  # starts the engine
            out["vllm_start_s"] = round(time.perf_counter() - t, 2)
        hf = models.load_policy(spec["model"], spec["dtype"])
        out["matmul_parameters"] = bm.matmul_parameters(hf)
        out["threads"] = torch.get_num_threads()
        del hf

        def run(backend: str, seed: int) -> int:
            return sum(
                len(s.ids) for p in by_backend[backend].sample(prompts, params, seed) for s in p
            )

        for b in spec["backends"]:  # warm-up (first-call allocations, kernel selection)
            run(b, spec["seed"])
        for r in range(spec["rounds"]):
            for b in spec["backends"]:
                t = time.perf_counter()
                tokens = run(b, spec["seed"] + r)
                out["rounds"][b].append({"tokens": tokens, "seconds": time.perf_counter() - t})
            out["rounds"]["matmul_flops"].append(bm.matmul_rate(dtype, spec["matmul_size"]))
    finally:
        for s in by_backend.values():
            s.close()
    for b in spec["backends"]:
        rates = [r["tokens"] / r["seconds"] for r in out["rounds"][b]]
        out[f"{b}_tokens_per_s"] = statistics.median(rates)
        expected = len(prompts) * n * new
        assert all(r["tokens"] == expected for r in out["rounds"][b]), (
            f"{b}: not every sample had {new} tokens"
        )
    out["matmul_flops"] = max(out["rounds"]["matmul_flops"])
    return out


def dpo(spec: dict) -> dict:
    """One DPO variant (``cached`` or ``recompute`` reference log-probs) for a few steps:
    seconds per step and the process's peak RSS."""
    from iterate.bench import update

    return update.dpo_variant(spec)


def rl(spec: dict) -> dict:
    """The on-policy rules' update stages, one per variant, on mini run folders
    (``update.rl_stages``): seconds per step and peak RSS of each."""
    from iterate.bench import update

    return update.rl_stages(spec)


def backends(spec: dict) -> dict:
    """A PPO update stage or the held-out evaluation stage with vLLM vs transformers
    sampling, alternating rounds in this process (``iterate.bench.backends``)."""
    from iterate.bench import backends

    return backends.measure(spec)


def sync(spec: dict) -> dict:
    """One way of putting a policy under training into vLLM, in this process:
    ``iterate.bench.backends.sync_variant``."""
    from iterate.bench import backends

    return backends.sync_variant(spec)


def workers(spec: dict) -> dict:
    """1 worker x T threads against T workers x 1 thread: ``iterate.bench.workers``."""
    from iterate.bench import workers

    return workers.measure(spec)


def padding(spec: dict) -> dict:
    """A DPO epoch over pairs of mixed lengths with one variant's settings:
    ``iterate.bench.update.padding_variant``."""
    from iterate.bench import update

    return update.padding_variant(spec)


def peers(spec: dict) -> dict:
    """One engine's DPO or GRPO step, the engine's or TRL's: ``iterate.bench.peers``."""
    from iterate.bench import peers

    return peers.measure(spec)


KINDS = {
    "generation": generation,
    "dpo": dpo,
    "rl": rl,
    "backends": backends,
    "sync": sync,
    "workers": workers,
    "padding": padding,
    "peers": peers,
}


if __name__ == "__main__":
    kind, spec_file, out_file = sys.argv[1:4]
    spec = read_json(spec_file, must_exist=True)
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    result = KINDS[kind](spec)
    Path(out_file).write_text(json.dumps(result, indent=2))
