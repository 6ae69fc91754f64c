"""Shards split among workers: 2 vLLM engine processes of 1 thread each write the shards
1 engine writes, and 2 scoring processes give the rewards 1 gives; plus who takes what."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from iterate import rewards, workers
from iterate.rewards import scorer as scoring
from iterate.rewards.pool import RewardPool
from iterate.sampling import samplers
from iterate.store.shards import shard_paths
from iterate.train import models

from .conftest import ROOT
from .test_sampling import PARAMS, SPEC, _prompts

pytestmark = pytest.mark.slow


def test_a_worker_thread_stops_at_its_next_job_once_a_stop_came():
    from iterate import faults

    got = []
    faults._INTERRUPTED.clear()
    try:
        for k in workers.each([1, 2, 3]):
            got.append(k)
            if k == 2:
                faults._INTERRUPTED.set()  # a SIGTERM reached the main thread meanwhile
        raise AssertionError("not stopped")
    except KeyboardInterrupt:
        assert got == [1, 2]
    finally:
        faults._INTERRUPTED.clear()


def test_deal_is_round_robin_over_sorted_keys():
    assert workers.deal([3, 0, 2, 1, 4], 2) == [[0, 2, 4], [1, 3]]
    assert workers.deal([0], 3) == [[0], [], []]


def test_engine_env_gives_each_worker_its_own_cores(monkeypatch):
    monkeypatch.setattr(workers, "cores", lambda: [0, 1, 2, 3])
    envs = [workers.engine_env(w, 2, 0, 1, cuda=False) for w in range(2)]
    assert [e["VLLM_CPU_OMP_THREADS_BIND"] for e in envs] == ["0,1", "2,3"]
    assert envs[0]["OMP_NUM_THREADS"] == "2"
    assert workers.engine_env(0, 1, 0, 1, cuda=False) == {}  # a lone worker: vLLM's defaults
    assert workers.engine_env(0, 1, 3, 1, cuda=False)["VLLM_CPU_OMP_THREADS_BIND"] == "0,1,2"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    cuda = [workers.engine_env(w, 2, 0, 2, cuda=True) for w in range(2)]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in cuda] == ["4,5", "6,7"]
    with pytest.raises(ValueError, match="4 are visible"):
        workers.engine_env(2, 3, 0, 2, cuda=True)


def _sample(world, out, envs) -> list:
    tok = models.load_tokenizer(str(world))
    shards, _ = samplers.plan(tok, _prompts(["Greet Leo.", "What is 1 plus 1?"]), 52, 2)
    sampler = samplers.VllmSampler(SPEC, envs)
    try:
        sampler.load(str(world))
        out.mkdir()
        samplers.write_shards(
            sampler, dict(enumerate(shards)), PARAMS, lambda k: 7 + k, out, (0, "x"), "test"
        )
        time.sleep(0.5)
        # started from this thread, not the stage's worker threads (which have ended)
        assert all(e.running for e in sampler.engines), "an engine died with its thread"
    finally:
        sampler.close()
    return [pq.read_table(p).to_pylist() for p in shard_paths(out)]


def test_two_engine_workers_write_the_shards_of_one(tiny_world, tmp_path):
    envs = lambda n: [workers.engine_env(w, n, 1, 1, cuda=False) for w in range(n)]  # noqa: E731
    one = _sample(tiny_world, tmp_path / "one", envs(1))
    two = _sample(tiny_world, tmp_path / "two", envs(2))
    assert len(one) == 4 and sum(len(s) for s in one) == 7 * PARAMS.n
    assert two == one


def test_two_scoring_workers_give_the_rewards_of_one(tiny_cfg, tiny_world, tmp_path):
    rc = tiny_cfg.reward
    rc.threads = 1
    model, tok = scoring.load_model(str(tiny_world), "float32", new_head=True)
    rm = tmp_path / "rm"  # an untrained reward model serves: the same weights in every worker
    model.save_pretrained(rm)
    tok.save_pretrained(rm)
    jobs = {
        k: ([p] * 3, [f"Hello {name}!" for name in ("Anna", "Leo", "Rosa")])
        for k, p in enumerate(["Greet Anna.", "Greet Leo.", "Greet Rosa.", "Hi."])
    }
    got = {}
    for n in (1, 2):
        rc.workers = n
        out = {}
        with RewardPool(rewards.of(tiny_cfg, path=str(rm)), n, rc.threads) as pool:
            pool.score_each(list(jobs), jobs.__getitem__, out.__setitem__)
        got[n] = out
    assert sorted(got[2]) == [0, 1, 2, 3] and got[2] == got[1]
    assert len({r for v in got[1].values() for r in v}) > 1  # real, differing rewards


WORKERS_OF_A_KILLED_RUN = """
import os, signal, sys, time
from iterate import rewards
from iterate.rewards.pool import RewardPool

pool = RewardPool(rewards.FunctionReward(sys.argv[1]), 2, 1)
jobs = {k: (["Hi."], ["Hello!" * (k + 1)]) for k in range(4)}
pool.score_each(list(jobs), jobs.__getitem__, lambda k, r: None)  # from threads, which end
pids = [pid for p in pool.pools for pid in p._processes]
print(" ".join(map(str, pids)), flush=True)
time.sleep(1)
print("alive" if all(os.path.exists(f"/proc/{pid}") for pid in pids) else "gone", flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # only this process: its scoring workers must follow
"""


def test_scoring_workers_die_with_a_killed_run(tmp_path):
    """A run killed alone (not its process group) leaves no scoring process behind (one
    would hold a GPU), and the workers outlive the threads that handed them their jobs."""
    fn = tmp_path / "length.py"
    fn.write_text("def length(prompts, responses):\n    return [len(r) for r in responses]\n")
    out = subprocess.run(
        [sys.executable, "-c", WORKERS_OF_A_KILLED_RUN, f"{fn}:length"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        start_new_session=True,
    )
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    pids, alive = out.stdout.splitlines()
    pids = [int(p) for p in pids.split()]
    assert len(pids) == 2 and alive == "alive", "the workers outlive the threads that used them"
    deadline = time.time() + 20
    while any(workers.alive(p) and not _zombie(p) for p in pids) and time.time() < deadline:
        time.sleep(0.2)
    assert not [p for p in pids if workers.alive(p) and not _zombie(p)], "a worker outlived it"


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
