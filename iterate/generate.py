"""Best-of-n generation into Parquet shards: vLLM in its own process, or transformers.

One request per prompt with ``n`` samples (the prompt is prefilled once). ``max_tokens`` is
always set. Prompts whose tokens leave no room for ``max_tokens`` within the model's
``max_length`` are dropped and counted, never allowed to fail the batch. Each row records
``finish_reason`` (``stop``: EOS, ``length``: hit ``max_tokens``) and token counts.

Shard ``k`` holds prompts ``[k*shard_size, (k+1)*shard_size)``; shards already on disk are
skipped, so a crash costs at most the shard being written. The vLLM engine runs in a child
process (``python -m iterate.generate job.json``), so its memory is returned when it ends,
and it is started only when a shard is missing.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa

from iterate import faults, progress
from iterate.config import Config, plain
from iterate.paths import Paths
from iterate.shards import (
    SCHEMAS,
    Stage,
    read_shards,
    shard_index,
    shard_path,
    shard_paths,
    write_shard,
)

log = logging.getLogger(__name__)


@dataclass
class Job:
    """Everything the engine's process needs; written as JSON for ``python -m iterate.generate``."""

    policy: str
    out: str
    iteration: int
    shards: dict[int, list[tuple[str, str, list[int]]]]  # shard -> [(prompt_id, prompt, ids)]
    n: int
    temperature: float
    top_p: float
    max_tokens: int
    max_length: int
    seed: int
    dtype: str
    batch_size: int
    gpu_memory_utilization: float
    enforce_eager: bool
    device: str = "auto"


def rows(prompt_id: str, prompt: str, n_prompt: int, samples: list[tuple[str, list[int], str]]) -> list[dict]:
    """Shard rows for one prompt from (text, token ids, finish_reason) samples."""
    return [
        {
            "prompt_id": prompt_id, "sample_idx": j, "prompt": prompt, "response": text,
            "prompt_tokens": n_prompt, "response_tokens": len(ids), "finish_reason": reason,
            "response_ids": list(ids),
        }  # fmt: skip
        for j, (text, ids, reason) in enumerate(samples)
    ]


def _write(job: Job, k: int, shard_rows: list[dict]) -> None:
    write_shard(pa.Table.from_pylist(shard_rows, schema=SCHEMAS["generate"]), shard_path(Path(job.out), k))
    faults.point(job.iteration, "generate", k + 1)


def run_vllm(job: Job) -> None:
    """Generate the job's shards with vLLM (call in a process of its own)."""
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=job.policy, dtype=job.dtype, seed=job.seed, max_model_len=job.max_length,
        gpu_memory_utilization=job.gpu_memory_utilization, enforce_eager=job.enforce_eager,
    )  # fmt: skip
    params = SamplingParams(n=job.n, temperature=job.temperature, top_p=job.top_p, max_tokens=job.max_tokens)
    bar = progress.bar(sum(len(v) for v in job.shards.values()), "generate (vLLM)", "prompt")
    for k, prompts in sorted(job.shards.items()):
        outs = llm.generate([{"prompt_token_ids": ids} for _, _, ids in prompts], params, use_tqdm=False)
        shard_rows = []
        for (pid, text, ids), out in zip(prompts, outs):
            samples = [(c.text, c.token_ids, "stop" if c.finish_reason == "stop" else "length") for c in out.outputs]
            shard_rows += rows(pid, text, len(ids), samples)
        _write(job, k, shard_rows)
        bar.update(len(prompts))
    bar.close()


def run_transformers(job: Job) -> None:
    """Generate the job's shards with transformers ``generate`` (left-padded batches)."""
    import torch

    from iterate import models

    dev = models.device(job.device)
    tok = models.load_tokenizer(job.policy)
    model = models.load_policy(job.policy, job.dtype, dev)
    bar = progress.bar(sum(len(v) for v in job.shards.values()), "generate (transformers)", "prompt")
    for k, prompts in sorted(job.shards.items()):
        torch.manual_seed(job.seed * 1_000_003 + k)  # per shard: a resumed shard is identical
        shard_rows = []
        for b in range(0, len(prompts), job.batch_size):
            batch = prompts[b : b + job.batch_size]
            ids, mask = models.pad([p[2] for p in batch], tok.pad_token_id, side="left")
            with torch.no_grad():
                out = model.generate(
                    input_ids=ids.to(dev), attention_mask=mask.to(dev), do_sample=True,
                    temperature=job.temperature, top_p=job.top_p, top_k=0, max_new_tokens=job.max_tokens,
                    num_return_sequences=job.n, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                )  # fmt: skip
            new = out[:, ids.shape[1] :].tolist()
            for j, (pid, text, p_ids) in enumerate(batch):
                samples = []
                for seq in new[j * job.n : (j + 1) * job.n]:
                    ended = tok.eos_token_id in seq
                    seq = seq[: seq.index(tok.eos_token_id) + 1] if ended else seq
                    samples.append((tok.decode(seq, skip_special_tokens=True), seq, "stop" if ended else "length"))
                shard_rows += rows(pid, text, len(p_ids), samples)
            bar.update(len(batch))
        _write(job, k, shard_rows)
    bar.close()


def _kill_with_parent() -> None:  # the engine's process dies with the program
    import ctypes
    import signal

    ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def launch(job: Job, backend: str) -> None:
    """Run the job: vLLM in a child process, transformers in this one."""
    if backend == "transformers":
        run_transformers(job)
        return
    path = Path(job.out) / "_job.json"
    path.write_text(json.dumps(asdict(job)))
    # The engine core runs inside this child process (no second spawn: ~20 s less start-up
    # on CPU); the child itself is what returns the engine's memory when it ends.
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_LOGGING_LEVEL": "ERROR", **os.environ}
    proc = subprocess.run([sys.executable, "-m", "iterate.generate", str(path)], env=env, preexec_fn=_kill_with_parent)
    if proc.returncode != 0:
        raise RuntimeError(f"generation engine failed (exit {proc.returncode}); shards written so far are kept in {job.out}")
    path.unlink()


def missing(shards: list[list], folder: Path) -> dict[int, list]:
    """The planned shards not yet on disk in ``folder`` (a shard that exists is complete)."""
    done = {shard_index(p) for p in shard_paths(folder)}
    return {k: s for k, s in enumerate(shards) if k not in done}


def plan(tokenizer, prompts: pa.Table, max_prompt: int, shard_size: int) -> tuple[list[list], Counter]:
    """Encode prompts, drop those too long, and cut the rest into shards."""
    from iterate.models import prompt_ids

    kept, dropped = [], Counter()
    for pid, text in zip(prompts["prompt_id"].to_pylist(), prompts["prompt"].to_pylist()):
        ids = prompt_ids(tokenizer, text)
        if len(ids) > max_prompt:
            dropped["prompt_too_long"] += 1
            continue
        kept.append((pid, text, ids))
    return [kept[i : i + shard_size] for i in range(0, len(kept), shard_size)], dropped


def run(cfg: Config, paths: Paths, i: int, policy: str, prompts: pa.Table) -> dict:
    from iterate.models import load_tokenizer

    gc = cfg.generate
    conf = {"generate": plain(gc), "model": plain(cfg.model), "policy": policy, "seed": cfg.seed}
    stage = Stage(paths.stage(i, "generate"), "generate", conf, inputs=[paths.stage(i, "prompts"), *paths.previous(i)])
    if stage.check(cfg.force):
        return stage.read_done()
    tok = load_tokenizer(policy, cfg.model.chat_template)
    shards, dropped = plan(tok, prompts, cfg.model.max_length - gc.max_tokens, gc.shard_size)
    if not shards:
        raise ValueError(
            f"generate: all {prompts.num_rows} prompts dropped ({dict(dropped)}): model.max_length "
            f"({cfg.model.max_length}) leaves no room for generate.max_tokens ({gc.max_tokens}) after the prompt"
        )
    todo = missing(shards, stage.path)
    if todo:
        log.info("generate: %d of %d shards to write (%s)", len(todo), len(shards), gc.backend)
        job = Job(
            policy=policy, out=str(stage.path), iteration=i, shards=todo, n=gc.n, temperature=gc.temperature,
            top_p=gc.top_p, max_tokens=gc.max_tokens, max_length=cfg.model.max_length,
            seed=cfg.seed * 1000 + i, dtype=str(cfg.model.dtype), batch_size=gc.batch_size,
            gpu_memory_utilization=gc.gpu_memory_utilization, enforce_eager=gc.enforce_eager, device=str(cfg.device),
        )  # fmt: skip
        launch(job, str(gc.backend))
    table = read_shards(stage.path, SCHEMAS["generate"])
    reasons = Counter(table["finish_reason"].to_pylist())
    return stage.finish(
        backend=str(gc.backend),
        prompts_in=prompts.num_rows,
        prompts_out=prompts.num_rows - sum(dropped.values()),
        rows_out=table.num_rows,
        dropped=dict(dropped),
        finish_reasons=dict(reasons),
        eos_rate=round(reasons.get("stop", 0) / max(1, table.num_rows), 4),
        response_tokens_mean=round(sum(table["response_tokens"].to_pylist()) / max(1, table.num_rows), 2),
        shards=len(shards),
    )


def _main(job_path: str) -> None:
    d = json.loads(Path(job_path).read_text())
    d["shards"] = {int(k): [tuple(p) for p in v] for k, v in d["shards"].items()}
    run_vllm(Job(**d))


if __name__ == "__main__":
    _main(sys.argv[1])
