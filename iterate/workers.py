"""Shards are the unit of parallel work: generation, labelling and the held-out evaluation
split their shards among workers, one per slice of the machine (a CPU core range, or
``per_worker`` GPUs). Each shard's work depends on its own seed and rows alone, so N
workers write the shards one worker writes.

This module only says which worker takes which shard and what each worker's slice is; the
workers themselves are vLLM engine processes (a ``samplers.VllmSampler``'s engines) or
scoring processes (``reward_pool.RewardPool``), driven from threads of the stage's process.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from iterate.errors import BadInput


def deal(keys: Iterable, workers: int) -> list[list]:
    """Round-robin: worker w takes every ``workers``-th key from the w-th."""
    keys = sorted(keys)
    return [keys[w::workers] for w in range(workers)]


def cores() -> list[int]:
    """The CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def share(workers: int, threads: int = 0) -> int:
    """Threads per worker: ``threads``, or (0) an equal share of this process's cores."""
    return threads or max(1, len(cores()) // workers)


@contextmanager
def torch_threads(threads: int):
    """This process's torch threads set to ``threads`` (0: left as they are) inside the
    block, and what they were afterwards."""
    if not threads:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cpu_slice(w: int, workers: int, threads: int = 0) -> list[int]:
    """Worker w's CPU cores: ``share(workers, threads)`` of them."""
    mine, t = cores(), share(workers, threads)
    return [mine[(w * t + j) % len(mine)] for j in range(t)]


def alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (the owner of a temporary file or a lock)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def gpu_slice(w: int, per_worker: int) -> list[str]:
    """Worker w's GPUs, from CUDA_VISIBLE_DEVICES (or all of them)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        ids = [d for d in visible.split(",") if d]
    else:
        import torch

        ids = [str(d) for d in range(torch.cuda.device_count())]
    need = (w + 1) * per_worker
    if need > len(ids):
        raise BadInput(
            f"worker {w} needs GPUs {w * per_worker}..{need - 1} but {len(ids)} are visible "
            "(fewer workers, or a smaller tensor_parallel_size)"
        )
    return ids[w * per_worker : need]


def engine_env(w: int, workers: int, threads: int, per_worker: int, cuda: bool) -> dict:
    """The environment of worker w's vLLM engine process: its GPUs, or its CPU cores
    (vLLM's OpenMP binding). Empty for a lone worker left to its defaults."""
    if cuda:
        return {"CUDA_VISIBLE_DEVICES": ",".join(gpu_slice(w, per_worker))} if workers > 1 else {}
    if workers == 1 and not threads:
        return {}
    mine = cpu_slice(w, workers, threads)
    return {
        "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, mine)),
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "OMP_NUM_THREADS": str(len(mine)),
    }


def each(keys: Iterable):
    """The keys of a worker thread's jobs, one at a time, stopping before the next once a
    Ctrl-C or SIGTERM came (it reaches the main thread only, which waits on these threads:
    a SIGTERM to the main process alone would otherwise let every worker finish its
    shards)."""
    from iterate import faults

    for k in keys:
        faults.stop_if_interrupted()
        yield k


def run_each(jobs: list[Callable[[], object]]) -> list:
    """Run the jobs (one per worker) in threads, each driving its worker process; their
    results in order. The first error is raised once every job has ended."""
    if len(jobs) <= 1:
        return [job() for job in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(job) for job in jobs]
        errors = [f.exception() for f in futures]
    for e in errors:
        if e is not None:
            raise e
    return [f.result() for f in futures]


def kill_with_parent() -> None:
    """Have the kernel kill this process when its parent dies (``PR_SET_PDEATHSIG``): what
    the engines and the update's ranks call it first, so none outlives a killed run. (It
    fires when the *thread* that started the child ends: only for children started from a
    thread that lives as long as they do.)"""
    import ctypes
    import signal

    ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)
