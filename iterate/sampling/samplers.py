"""The one sampler: every place that samples a policy (the generate stage, the held-out
evaluation and its initial-policy baseline, PPO and ReMax rollouts, the benchmark) goes
through ``Sampler.sample``, with the backend chosen once by ``generate.backend``.

- ``vllm``: a vLLM engine in its own process (``iterate.sampling.engine``). With
  ``generate.keep_engine`` (CPU) one engine serves the whole run, and each new policy is
  loaded into it in place.
- ``transformers``: ``generate`` in this process, left-padded batches.

What to sample from: ``load(policy)``, a model folder; or ``sync(model, tokenizer,
policy)``, a model in memory (the policy under training, or the base with an update's
adapter). The transformers sampler samples that model itself; vLLM gets its weights, with
any LoRA adapter merged into a copy, loaded in place. Merged weights, not adapters served
by id, because vLLM on CPU samples 5x slower through a LoRA adapter (29M Llama: 334 vs
1634 tokens/s; ``python -m iterate.bench sections=[sync]``), for about the same cost per
sync.

Every call is seeded (``seeds.derive``), so its samples are a function of the seed and the
prompts alone: a shard or a rollout redone after a crash equals the uninterrupted run's.
``max_tokens`` is always set; each sample records its token ids and ``finish_reason``
(``stop``: EOS, ``length``: hit ``max_tokens``).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import pyarrow as pa
import torch

from iterate import faults, progress, workers
from iterate.config import Config
from iterate.sampling import engine
from iterate.store.shards import SCHEMAS, shard_index, shard_path, shard_paths, write_shard
from iterate.train import models

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Params:
    n: int = 1
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    max_tokens: int = 48
    ignore_eos: bool = False  # always max_tokens tokens (the benchmark's fixed lengths)
    # each sampled token's log-prob under the sampler's own numerics, from the raw logits
    # (before temperature and top-p, as the trainer computes them): the on-policy rollouts
    logprobs: bool = False


@dataclass
class Sample:
    text: str
    ids: list[int]  # the sampled tokens, EOS included when the sample ended with it
    finish_reason: str  # stop | length
    logps: list[float] | None = None  # with Params.logprobs: each sampled token's log-prob


@dataclass(frozen=True)
class Spec:
    """How to run a policy: the engine settings (a change restarts a vLLM engine)."""

    dtype: str = "float32"
    max_length: int = 256
    device: str = "auto"
    batch_size: int = 64  # transformers: prompts per generate() call
    gpu_memory_utilization: float = 0.25
    enforce_eager: bool = True
    tensor_parallel_size: int = 1  # vLLM: GPUs per engine
    sleep_level: int = 0  # vLLM on CUDA: the kept engine sleeps between stages (1 or 2)
    engine_stall_s: float = 600  # vLLM: an engine idle this long on a request is killed

    @classmethod
    def of(cls, cfg: Config) -> Spec:
        gc = cfg.generate
        cuda = models.device(str(cfg.device)).type == "cuda"
        return cls(
            dtype=str(cfg.model.dtype),
            max_length=cfg.model.max_length,
            device=str(cfg.device),
            batch_size=gc.batch_size,
            gpu_memory_utilization=gc.gpu_memory_utilization,
            enforce_eager=gc.enforce_eager,
            tensor_parallel_size=gc.tensor_parallel_size,
            sleep_level=gc.sleep_level if cuda and gc.backend == "vllm" else 0,
            engine_stall_s=gc.engine_stall_s,
        )


class TransformersSampler:
    """transformers ``generate`` in this process."""

    workers = 1

    def __init__(self, spec: Spec):
        self.spec, self.dev = spec, models.device(spec.device)
        self.model = self.tok = None
        self.source: tuple | None = None
        self.timings: dict[str, float] = {}

    def load(self, policy: str) -> None:
        if self.source != policy:
            with progress.Timer(self.timings)("load_s"):
                self.tok = models.load_tokenizer(policy)
                self.model = models.load_policy(policy, self.spec.dtype, self.dev)
            self.source = policy

    def ready(self) -> None:
        """Nothing to start: sampling happens in this process."""

    def sync(self, model, tokenizer, policy: str) -> None:
        """Sample ``model`` itself from now on (no copy)."""
        self.model, self.tok, self.source = model, tokenizer, None

    @torch.no_grad()
    def sample(
        self, prompts: list[list[int]], params: Params, seed: int, worker: int = 0
    ) -> list[list[Sample]]:
        tok, model = self.tok, self.model
        was_training = model.training
        model.eval()
        kw = (
            {"do_sample": False}
            if params.temperature == 0
            else {
                "do_sample": True,
                "temperature": params.temperature,
                "top_p": params.top_p,
                "top_k": 0,
            }
        )
        if params.ignore_eos:
            kw["min_new_tokens"] = params.max_tokens
        if params.logprobs:  # the raw logits of each step, to read the sampled token's log-prob
            kw |= {"output_logits": True, "return_dict_in_generate": True}
        out: list[list[Sample]] = []
        with (
            progress.Timer(self.timings)("sample_s"),
            torch.random.fork_rng(devices=[self.dev] if self.dev.type == "cuda" else []),
        ):
            torch.manual_seed(seed)
            for b in range(0, len(prompts), self.spec.batch_size):
                ids, mask = models.pad(
                    prompts[b : b + self.spec.batch_size], tok.pad_token_id, side="left"
                )
                got = model.generate(
                    input_ids=ids.to(self.dev),
                    attention_mask=mask.to(self.dev),
                    max_new_tokens=params.max_tokens,
                    num_return_sequences=params.n,
                    pad_token_id=tok.pad_token_id,
                    eos_token_id=tok.eos_token_id,
                    **kw,
                )
                new = (got.sequences if params.logprobs else got)[:, ids.shape[1] :]
                lps = None
                if params.logprobs:  # (rows, steps): each sampled token's raw log-prob
                    steps = torch.stack(got.logits, 1).float().log_softmax(-1)
                    lps = steps.gather(-1, new[:, : steps.shape[1], None]).squeeze(-1).tolist()
                seqs = new.tolist()
                for j in range(0, len(seqs), params.n):
                    out.append(
                        [
                            self._sample(s, params.ignore_eos, lps[k] if lps else None)
                            for k, s in enumerate(seqs[j : j + params.n], start=j)
                        ]
                    )
        model.train(was_training)
        return out

    def _sample(self, seq: list[int], ignore_eos: bool, logps: list[float] | None) -> Sample:
        eos = self.tok.eos_token_id
        ended = eos in seq and not ignore_eos
        seq = seq[: seq.index(eos) + 1] if ended else seq
        text = self.tok.decode(seq, skip_special_tokens=True)
        logps = logps[: len(seq)] if logps is not None else None
        return Sample(text, seq, "stop" if ended else "length", logps)

    def close(self) -> None:
        self.model = self.tok = self.source = None


class VllmSampler:
    """vLLM engines, each in its own process (``iterate.sampling.engine``) with its own slice of the
    machine (``workers.engine_env``): one for a single request, all of them for shards."""

    def __init__(self, spec: Spec, envs: list[dict] | None = None):
        self.spec, self.envs = spec, envs or [{}]
        self.engines = [engine.Engine(env, spec.engine_stall_s) for env in self.envs]
        self.policy: str | None = None
        self.version = 0  # 0: the policy folder's weights; n: the n-th synced set
        self.synced = 0
        self.timings: dict[str, float] = {}
        self._lock = threading.Lock()

    @property
    def workers(self) -> int:
        return len(self.engines)

    def load(self, policy: str) -> None:
        self.policy, self.version = policy, 0

    def sync(self, model, tokenizer, policy: str) -> None:
        """Load ``model``'s weights (a LoRA adapter merged into a copy) into every engine in
        place; ``policy`` is a folder of the same architecture, where a new engine starts."""
        self.policy, self.synced = policy, self.synced + 1
        self.version = self.synced
        self.ready()
        with engine.weights_file(model) as path:
            request = {"op": "weights", "weights_file": path}
            workers.run_each([partial(self._request, request, w) for w in range(self.workers)])

    def sample(
        self, prompts: list[list[int]], params: Params, seed: int, worker: int = 0
    ) -> list[list[Sample]]:
        samples = self._request(
            {"op": "sample", "prompts": prompts, "params": asdict(params), "seed": seed}, worker
        )
        return [[Sample(*x) for x in per_prompt] for per_prompt in samples]

    def _envelope(self, request: dict) -> dict:
        skip = ("device", "batch_size", "engine_stall_s")  # not what an engine is built for
        engine = {k: v for k, v in asdict(self.spec).items() if k not in skip}
        return {
            **request,
            "policy": self.policy,
            "version": self.version,
            "engine": engine,
            "seed": request.get("seed", 0),
        }

    def ready(self) -> None:
        """Start (or restart) every engine's process from this thread before threads drive
        them: a process dies with the thread that started it."""
        for e in self.engines:
            e.ensure(self._envelope({}))

    def _request(self, request: dict, worker: int = 0):
        samples, timings = self.engines[worker].request(self._envelope(request))
        with self._lock:  # engine start, weight loads, sampling; summed over the workers
            for k, v in timings.items():  # seconds add up; a peak (``_mb``) is the highest
                was = self.timings.get(k, 0.0)
                self.timings[k] = max(was, v) if k.endswith("_mb") else round(was + v, 3)
        return samples

    def sleep(self) -> None:
        """Release the engines' GPU memory (weights and KV cache) until the next request."""
        jobs = [  # only running engines: sleeping must not start one
            partial(self._request, {"op": "sleep", "level": self.spec.sleep_level}, w)
            for w, e in enumerate(self.engines)
            if e.running
        ]
        workers.run_each(jobs)

    def close(self) -> None:
        for e in self.engines:
            e.close()


Sampler = TransformersSampler | VllmSampler
_KEPT: dict[str, VllmSampler] = {}


def make(backend: str, spec: Spec, envs: list[dict] | None = None) -> Sampler:
    return VllmSampler(spec, envs) if backend == "vllm" else TransformersSampler(spec)


def engine_envs(cfg: Config) -> list[dict]:
    """One environment per vLLM engine worker (``generate.workers``)."""
    gc = cfg.generate
    cuda = models.device(str(cfg.device)).type == "cuda"
    return [
        workers.engine_env(w, gc.workers, gc.threads, gc.tensor_parallel_size, cuda)
        for w in range(gc.workers)
    ]


@dataclass(frozen=True)
class How:
    """How a stage samples (what ``session`` opens; picklable, so a reward that samples, a
    generative judge, carries it to its scoring process): the backend, the engine settings,
    one environment per vLLM engine, and whether the engines are kept for the whole run."""

    backend: str
    spec: Spec
    envs: tuple
    keep: bool

    @classmethod
    def of(cls, cfg: Config, spec: Spec | None = None) -> How:
        backend, spec = str(cfg.generate.backend), spec or Spec.of(cfg)
        cpu = models.device(spec.device).type == "cpu"
        keep = backend == "vllm" and (cfg.generate.keep_engine if cpu else spec.sleep_level > 0)
        return cls(backend, spec, tuple(engine_envs(cfg)), keep)


@contextmanager
def session(cfg: Config):
    """The sampler of the run's policies for one stage (``opened``)."""
    with opened(How.of(cfg)) as sampler:
        yield sampler


@contextmanager
def opened(how: How, name: str = "policy"):
    """The sampler for one stage. The vLLM engines are kept for the whole run
    (``close_kept`` ends them): on CPU when ``generate.keep_engine``, and on CUDA when
    ``generate.sleep_level`` > 0, where they sleep between stages so the update has the GPU
    memory, and wake for the next (seconds, against a new engine's tens of seconds).
    Otherwise each stage starts its own engines and ends them. ``name``: whose engines they
    are (the policies', a judge's): each keeps its own, never loading the other's model."""
    spec, envs = how.spec, list(how.envs)
    if how.keep:
        if name in _KEPT and _KEPT[name].envs != envs:
            _KEPT.pop(name).close()
        sampler = _KEPT.setdefault(name, VllmSampler(spec, envs))
        sampler.spec, sampler.timings = spec, {}
    else:
        sampler = make(how.backend, spec, envs)
    try:
        yield sampler
    finally:
        if not how.keep:
            sampler.close()
        elif spec.sleep_level:
            sampler.sleep()


def close_kept() -> None:
    """End the kept engine, if any (the loop calls this when a run ends)."""
    for sampler in _KEPT.values():
        sampler.close()
    _KEPT.clear()


# ---- sampling prompts into Parquet shards (the generate stage, the held-out evaluation) ----

Planned = tuple[str, str, list[int]]  # (prompt_id, prompt, chat-template token ids)


def plan(
    tokenizer, prompts: pa.Table, max_prompt: int, shard_size: int
) -> tuple[list[list[Planned]], Counter]:
    """Encode prompts in the policy's chat template, drop (and count) those that leave no
    room for the response, and cut the rest into shards of ``shard_size`` prompts."""
    from jinja2.exceptions import TemplateError

    kept, dropped = [], Counter()
    for pid, text in zip(prompts["prompt_id"].to_pylist(), prompts["prompt"].to_pylist()):
        try:
            ids = models.prompt_ids(tokenizer, text)
        except TemplateError as e:  # e.g. turns that do not alternate
            if not dropped["template_refused"]:
                log.warning("prompt %s dropped: the chat template refused it: %s", pid, e)
            dropped["template_refused"] += 1
            continue
        if len(ids) > max_prompt:
            dropped["prompt_too_long"] += 1
            continue
        kept.append((pid, text, ids))
    return [kept[i : i + shard_size] for i in range(0, len(kept), shard_size)], dropped


def missing(shards: list[list[Planned]], folder: Path) -> dict[int, list[Planned]]:
    """The planned shards not yet on disk in ``folder`` (a shard that exists is complete)."""
    done = {shard_index(p) for p in shard_paths(folder)}
    return {k: s for k, s in enumerate(shards) if k not in done}


def shard_rows(planned: list[Planned], samples: list[list[Sample]]) -> list[dict]:
    return [
        {
            "prompt_id": pid,
            "sample_idx": j,
            "prompt": text,
            "response": s.text,
            "prompt_tokens": len(ids),
            "response_tokens": len(s.ids),
            "finish_reason": s.finish_reason,
            "response_ids": list(s.ids),
        }
        for (pid, text, ids), per_prompt in zip(planned, samples, strict=True)
        for j, s in enumerate(per_prompt)
    ]


SUMMARY_COLUMNS = ["finish_reason", "response_tokens"]  # what ``summary`` reads


def summary(table: pa.Table) -> dict:
    """EOS rate and mean length of sampled rows (the generate and evaluate stages)."""
    reasons = Counter(table["finish_reason"].to_pylist())
    rows = max(1, table.num_rows)
    return {
        "finish_reasons": dict(reasons),
        "eos_rate": round(reasons.get("stop", 0) / rows, 4),
        "response_tokens_mean": round(sum(table["response_tokens"].to_pylist()) / rows, 2),
    }


def write_shards(
    sampler: Sampler,
    todo: dict[int, list[Planned]],
    params: Params,
    seed_of: Callable[[int], int],
    out: Path,
    fault: tuple[int, str],
    desc: str,
) -> None:
    """Sample each shard (seeded by ``seed_of(shard)``) and write it atomically; a crash
    costs at most the shards being sampled. The shards are dealt out among the sampler's
    workers (``workers.deal``), each sampling its own in turn. ``fault``: (iteration, stage)
    for the crash tests."""
    bar = progress.bar(sum(len(v) for v in todo.values()), desc, "prompt")

    def work(w: int, keys: list[int]) -> None:
        for k in workers.each(keys):
            planned = todo[k]
            samples = sampler.sample([ids for _, _, ids in planned], params, seed_of(k), w)
            write_shard(
                pa.Table.from_pylist(shard_rows(planned, samples), schema=SCHEMAS["generate"]),
                shard_path(out, k),
            )
            faults.point(*fault, k + 1)
            bar.update(len(planned))

    groups = workers.deal(todo, sampler.workers)
    sampler.ready()
    workers.run_each([partial(work, w, keys) for w, keys in enumerate(groups)])
    bar.close()
