"""Measurements that need a process of their own: ``python -m iterate.bench.child KIND
SPEC.json OUT.json``. A vLLM engine per model and dtype (``generation``); peak RSS, a
high-water mark per process, of one DPO variant (``dpo``) or one on-policy update stage
(``rl``)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from iterate.bench import models as bm


def run(kind: str, spec: dict, workdir: Path) -> dict:
    """Run a measurement in a child process and return its results."""
    import os

    from iterate.generate import _kill_with_parent

    workdir.mkdir(parents=True, exist_ok=True)
    spec_path, out_path = workdir / f"{kind}_spec.json", workdir / f"{kind}_out.json"
    spec_path.write_text(json.dumps(spec))
    out_path.unlink(missing_ok=True)
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_LOGGING_LEVEL": "ERROR", **os.environ}
    cmd = [sys.executable, "-m", "iterate.bench.child", kind, str(spec_path), str(out_path)]
    proc = subprocess.run(cmd, env=env, preexec_fn=_kill_with_parent)
    if proc.returncode != 0 or not out_path.exists():
        raise RuntimeError(f"bench {kind} child failed (exit {proc.returncode}); spec: {spec_path}")
    return json.loads(out_path.read_text())


def generation(spec: dict) -> dict:
    """vLLM and transformers on the same model, prompts and sampling, alternating rounds,
    with the matmul rate measured between them."""
    from iterate import models

    dtype = models.DTYPES[spec["dtype"]]
    n, new, prompts = spec["n"], spec["new_tokens"], spec["prompts"]
    out: dict = {"rounds": {b: [] for b in spec["backends"]} | {"matmul_flops": []}}
    llm = None
    if "vllm" in spec["backends"]:
        from vllm import LLM, SamplingParams

        t = time.perf_counter()
        llm = LLM(model=spec["model"], dtype=spec["dtype"], seed=spec["seed"],
                  gpu_memory_utilization=spec["gpu_memory_utilization"], enforce_eager=spec["enforce_eager"])  # fmt: skip
        out["vllm_start_s"] = round(time.perf_counter() - t, 2)
        params = SamplingParams(n=n, temperature=1.0, top_p=1.0, max_tokens=new, min_tokens=new, ignore_eos=True)
    dev = models.device("auto")
    hf = models.load_policy(spec["model"], spec["dtype"], dev)
    out["matmul_parameters"] = bm.matmul_parameters(hf)
    out["threads"] = torch.get_num_threads()
    tok = models.load_tokenizer(spec["model"])
    ids, mask = models.pad(prompts, tok.pad_token_id, side="left")
    ids, mask = ids.to(dev), mask.to(dev)

    def run_vllm() -> int:
        res = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return sum(len(c.token_ids) for r in res for c in r.outputs)

    def run_hf() -> int:
        with torch.no_grad():
            seqs = hf.generate(
                input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                max_new_tokens=new, min_new_tokens=new, num_return_sequences=n, pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )  # fmt: skip
        return (seqs.shape[1] - ids.shape[1]) * seqs.shape[0]

    runners = {"vllm": run_vllm, "transformers": run_hf}
    for b in spec["backends"]:  # warm-up (first-call allocations, kernel selection)
        runners[b]()
    for _ in range(spec["rounds"]):
        for b in spec["backends"]:
            t = time.perf_counter()
            tokens = runners[b]()
            out["rounds"][b].append({"tokens": tokens, "seconds": time.perf_counter() - t})
        out["rounds"]["matmul_flops"].append(bm.matmul_rate(dtype, spec["matmul_size"]))
    for b in spec["backends"]:
        rates = [r["tokens"] / r["seconds"] for r in out["rounds"][b]]
        out[f"{b}_tokens_per_s"] = statistics.median(rates)
        expected = len(prompts) * n * new
        assert all(r["tokens"] == expected for r in out["rounds"][b]), f"{b}: not every sample had {new} tokens"
    out["matmul_flops"] = max(out["rounds"]["matmul_flops"])
    return out


def dpo(spec: dict) -> dict:
    """One DPO variant (``cached`` or ``recompute`` reference log-probs) for a few steps:
    seconds per step and the process's peak RSS."""
    from iterate.bench import update

    return update.dpo_variant(spec)


def rl(spec: dict) -> dict:
    """One on-policy update stage (PPO or ReMax) on a mini run folder; its peak RSS."""
    from iterate.bench import update

    return update.rl_stage(spec)


if __name__ == "__main__":
    kind, spec_file, out_file = sys.argv[1:4]
    spec = json.loads(Path(spec_file).read_text())
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    result = {"generation": generation, "dpo": dpo, "rl": rl}[kind](spec)
    Path(out_file).write_text(json.dumps(result, indent=2))
