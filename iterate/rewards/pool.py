"""Many shards scored at once: ``RewardPool`` deals scoring jobs out among processes (one
per GPU, or CPU threads each), each holding its own copy of a reward (``rewards.Reward``),
loaded once per process and dying with the run."""

from __future__ import annotations

from functools import partial

from iterate import workers
from iterate.rewards.base import Reward

_WORKER_REWARD: Reward | None = None  # in a scoring worker process


def _start_worker(reward: Reward, device: str, threads: int) -> None:
    import torch

    global _WORKER_REWARD
    workers.kill_with_parent()  # a scoring process holds a model (a GPU): none outlives a run
    if threads:
        torch.set_num_threads(threads)
    _WORKER_REWARD = reward.on(device)


def _score_in_worker(prompts: list, responses: list[str], desc: str, detail: bool):
    return _WORKER_REWARD.score(prompts, responses, desc=desc, refusals=True, detail=detail)


class RewardPool:
    """Rewards for many shards at once: ``score_each(keys, texts, done)`` scores each job (a
    shard's prompts and responses, ``texts(key)``, read when its turn comes) in one
    ``score`` call and hands the rewards to ``done(key, rewards)`` as each finishes
    (``None`` for a pair the reward refuses). With ``processes`` = 1 it scores in this
    process; with N > 1 the jobs are dealt out among N processes (one per GPU, or each with
    ``threads`` CPU threads), each holding its own copy of the reward. A job's rewards are
    the same whichever process scores it."""

    def __init__(self, reward: Reward, processes: int = 1, threads: int = 0):
        self.reward, self.processes, self.threads = reward, processes, threads
        self.pools: list = []

    def _open(self) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        import torch

        if self.processes == 1 or self.pools:
            return
        cuda = str(getattr(self.reward, "device", "cpu")).startswith("cuda")
        n_gpu = torch.cuda.device_count() if cuda else 0
        threads = workers.share(self.processes, self.threads)
        for w in range(self.processes):
            device = f"cuda:{w % n_gpu}" if n_gpu else "cpu"
            self.pools.append(
                ProcessPoolExecutor(
                    1,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_start_worker,
                    initargs=(self.reward, device, 0 if n_gpu else threads),
                )
            )
        # start them all now, from this thread: a process dies with the thread that started
        # it (``workers.kill_with_parent``), and the executor starts one on the first
        # ``submit``, which ``score_each`` makes from threads that end with the stage
        for pool in self.pools:
            pool.submit(int).result()

    def score_each(self, keys, texts, done, desc: str = "score", detail: bool = False) -> None:
        """``texts(key)`` -> (prompts, responses); ``done(key, rewards)`` per finished job
        (``rewards`` is ``(rewards, spreads, parts)`` with ``detail``, see ``Reward.score``).
        Each process holds one job's texts at a time."""
        self._open()

        def work(w: int, mine: list) -> None:
            for k in workers.each(mine):
                if not self.pools:
                    got = self.reward.score(*texts(k), desc=desc, refusals=True, detail=detail)
                else:
                    got = self.pools[w].submit(_score_in_worker, *texts(k), desc, detail).result()
                done(k, got)

        groups = workers.deal(keys, max(1, len(self.pools)))
        workers.run_each([partial(work, w, mine) for w, mine in enumerate(groups)])

    def close(self) -> None:
        for pool in self.pools:
            pool.shutdown()
        self.pools = []

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
