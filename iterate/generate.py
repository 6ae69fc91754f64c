"""Best-of-n generation into Parquet shards: vLLM in its own process, or transformers.

One request per prompt with ``n`` samples (the prompt is prefilled once). ``max_tokens`` is
always set. Prompts whose tokens leave no room for ``max_tokens`` within the model's
``max_length`` are dropped and counted, never allowed to fail the batch. Each row records
``finish_reason`` (``stop``: EOS, ``length``: hit ``max_tokens``) and token counts.

Shard ``k`` holds prompts ``[k*shard_size, (k+1)*shard_size)``; shards already on disk are
skipped, so a crash costs at most the shard being written. The vLLM engine runs in a child
process (``python -m iterate.generate --serve``), started only when a shard is missing. With
``generate.keep_engine`` (CPU) that process lives for the whole run: the next iteration's
policy is loaded into it in place (vLLM's ``reload_weights``, ~0.1 s on the toy policy)
instead of paying the engine's start-up again. Without it, or on CUDA (where the engine
would hold the GPU memory the update needs), each generate stage starts its own engine and
its memory is returned when it ends.
"""

from __future__ import annotations

import json
import logging
import os
import socket
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


def engine_key(job: Job) -> dict:
    """What an engine is built for; a job with another key needs a new engine. The
    architecture is read from the policy's config.json, so any policy of the same shape can
    be loaded into a running engine; a hub id (no local folder) is its own key."""
    config = Path(job.policy) / "config.json"
    if config.exists():
        skip = ("_name_or_path", "transformers_version", "dtype", "torch_dtype")
        arch = {k: v for k, v in json.loads(config.read_text()).items() if k not in skip}
    else:
        arch = {"policy": job.policy}
    return {"arch": arch, "dtype": job.dtype, "max_length": job.max_length,
            "gpu_memory_utilization": job.gpu_memory_utilization, "enforce_eager": job.enforce_eager}  # fmt: skip


def start_llm(job: Job):
    from vllm import LLM

    return LLM(
        model=job.policy, dtype=job.dtype, seed=job.seed, max_model_len=job.max_length,
        gpu_memory_utilization=job.gpu_memory_utilization, enforce_eager=job.enforce_eager,
    )  # fmt: skip


def load_policy_into(llm, policy: str) -> None:
    """Replace the running engine's weights with ``policy``'s, in place, and drop cached
    prefixes computed with the old weights."""
    llm.collective_rpc("reload_weights", kwargs={"weights_path": policy})
    llm.reset_prefix_cache()


def generate_shards(llm, job: Job) -> None:
    """Generate the job's shards with a running vLLM engine. The engine runs in this
    process, so seeding it before each shard makes a shard a function of (seed, shard)
    alone: a shard regenerated after a crash, or by an engine kept from an earlier
    iteration, is the same as the uninterrupted run's (per-request seeds fail on CPU)."""
    from vllm import SamplingParams
    from vllm.utils.torch_utils import set_random_seed

    params = SamplingParams(n=job.n, temperature=job.temperature, top_p=job.top_p, max_tokens=job.max_tokens)
    bar = progress.bar(sum(len(v) for v in job.shards.values()), "generate (vLLM)", "prompt")
    for k, prompts in sorted(job.shards.items()):
        set_random_seed(job.seed * 1_000_003 + k)  # as the transformers backend seeds a shard
        outs = llm.generate([{"prompt_token_ids": ids} for _, _, ids in prompts], params, use_tqdm=False)
        shard_rows = []
        for (pid, text, ids), out in zip(prompts, outs):
            samples = [(c.text, c.token_ids, "stop" if c.finish_reason == "stop" else "length") for c in out.outputs]
            shard_rows += rows(pid, text, len(ids), samples)
        _write(job, k, shard_rows)
        bar.update(len(prompts))
    bar.close()


def serve(fd: int) -> None:
    """The engine process: run jobs sent over the socket ``fd`` until it closes. The first
    job starts the engine; a job for another policy of the same shape loads its weights in
    place. Replies ``{"ok": bool, "timings": {...}, "error": str}`` per job."""
    from multiprocessing.connection import Connection

    conn = Connection(fd)
    llm, loaded = None, None
    while True:
        try:
            job = Job(**conn.recv())
        except EOFError:
            return
        job.shards = {int(k): [tuple(p) for p in v] for k, v in job.shards.items()}
        timer = progress.Timer()
        try:
            if llm is None:
                with timer("engine_start_s"):
                    llm = start_llm(job)
            elif loaded != job.policy:
                with timer("weights_load_s"):
                    load_policy_into(llm, job.policy)
            loaded = job.policy
            with timer("generate_s"):
                generate_shards(llm, job)
            conn.send({"ok": True, "timings": timer.seconds})
        except Exception as e:  # reported to the parent, which raises it with context
            log.exception("generation job failed")
            conn.send({"ok": False, "timings": timer.seconds, "error": f"{type(e).__name__}: {e}"})
            return


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


class Engine:
    """A vLLM engine in a child process (``python -m iterate.generate --serve``), reused for
    every job with the same ``engine_key``. The child dies with this process (PDEATHSIG)."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.conn = None
        self.key: dict | None = None

    def run(self, job: Job) -> dict:
        """Run one job; returns its timings (engine start or weight load, generation)."""
        from multiprocessing.connection import Connection

        key = engine_key(job)
        if self.proc is not None and (key != self.key or self.proc.poll() is not None):
            self.close()
        if self.proc is None:
            ours, theirs = socket.socketpair()
            # the engine core runs inside this child (no second spawn: ~20 s less start-up on CPU)
            env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_LOGGING_LEVEL": "ERROR", **os.environ}
            try:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "iterate.generate", "--serve", str(theirs.fileno())],
                    env=env, pass_fds=[theirs.fileno()], preexec_fn=_kill_with_parent,
                )  # fmt: skip
            except BaseException:
                ours.close()
                raise
            finally:
                theirs.close()
            self.conn, self.key = Connection(ours.detach()), key
        try:
            self.conn.send(asdict(job))
            reply = self.conn.recv()
        except (EOFError, OSError):
            reply = {"ok": False, "error": f"engine process ended (exit status {self.proc.poll()})"}
        if not reply["ok"]:
            self.close()
            raise RuntimeError(f"generation engine failed ({reply['error']}); shards written so far are kept in {job.out}")
        return reply["timings"]

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        if self.proc is not None:
            try:
                self.proc.wait(timeout=30)  # the socket closing ends its loop
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = self.conn = self.key = None


_ENGINE = Engine()


def close_engine() -> None:
    """Stop the kept engine, if any (the loop calls this when a run ends)."""
    _ENGINE.close()


def launch(job: Job, backend: str, keep_engine: bool = False) -> dict:
    """Run the job: vLLM in a child process (kept for the next job when ``keep_engine``),
    transformers in this one. Returns timings in seconds."""
    if backend == "transformers":
        timer = progress.Timer()
        with timer("generate_s"):
            run_transformers(job)
        return timer.seconds
    engine = _ENGINE if keep_engine else Engine()
    try:
        return engine.run(job)
    finally:
        if not keep_engine:
            engine.close()


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


# settings that change how generation runs, not what it writes
NOT_HASHED = ("keep_engine",)


def run(cfg: Config, paths: Paths, i: int, policy: str, prompts: pa.Table) -> dict:
    from iterate import models

    gc = cfg.generate
    gen_conf = {k: v for k, v in plain(gc).items() if k not in NOT_HASHED}
    conf = {"generate": gen_conf, "model": plain(cfg.model), "policy": policy, "seed": cfg.seed}
    stage = Stage(paths.stage(i, "generate"), "generate", conf, inputs=[paths.stage(i, "prompts"), *paths.previous(i)])
    if stage.check(cfg.force):
        return stage.read_done()
    tok = models.load_tokenizer(policy, cfg.model.chat_template)
    shards, dropped = plan(tok, prompts, cfg.model.max_length - gc.max_tokens, gc.shard_size)
    if not shards:
        raise ValueError(
            f"generate: all {prompts.num_rows} prompts dropped ({dict(dropped)}): model.max_length "
            f"({cfg.model.max_length}) leaves no room for generate.max_tokens ({gc.max_tokens}) after the prompt"
        )
    todo = missing(shards, stage.path)
    timings = {}
    if todo:
        log.info("generate: %d of %d shards to write (%s)", len(todo), len(shards), gc.backend)
        job = Job(
            policy=policy, out=str(stage.path), iteration=i, shards=todo, n=gc.n, temperature=gc.temperature,
            top_p=gc.top_p, max_tokens=gc.max_tokens, max_length=cfg.model.max_length,
            seed=cfg.seed * 1000 + i, dtype=str(cfg.model.dtype), batch_size=gc.batch_size,
            gpu_memory_utilization=gc.gpu_memory_utilization, enforce_eager=gc.enforce_eager, device=str(cfg.device),
        )  # fmt: skip
        keep = gc.keep_engine and models.device(str(cfg.device)).type == "cpu"
        timings = launch(job, str(gc.backend), keep_engine=keep)
        if still := missing(shards, stage.path):
            raise RuntimeError(f"generate: the engine ended without writing shards {sorted(still)} in {stage.path}")
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
        timings=timings,
    )


if __name__ == "__main__" and sys.argv[1:2] == ["--serve"]:
    _kill_with_parent()
    serve(int(sys.argv[2]))
