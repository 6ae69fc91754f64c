"""The loop end to end on the tiny world: the exact run tree, a no-op re-run, crash-and-rerun
at three points, the KL gate, and a sweep. Runs the real CLI in subprocesses."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from iterate import track, winrate
from iterate.report import metrics, runinfo, show
from iterate.run import loop
from iterate.store.paths import STAGES, Paths
from iterate.store.shards import read_shards
from iterate.toy import world

from .conftest import ROOT, TINY, cli, compose_cfg, tensorboard_events

pytestmark = pytest.mark.slow


def _args(tiny_cache, tiny_rm, runs_dir, *extra, backend="transformers") -> list[str]:
    return [
        *TINY,
        f"runs_dir={runs_dir}",
        f"toy.cache_dir={tiny_cache}",
        f"generate={backend}",
        "reward.train=false",
        f"reward.path={tiny_rm}",
        "generate.shard_size=4",
        "report_to=[tensorboard]",  # every loop test tracks: the kills and resumes too
        *extra,
    ]


def _tree(run: Path) -> set[str]:
    """Files under the run, with model folders collapsed to the folder itself."""
    out = set()
    for p in run.rglob("*"):
        rel = p.relative_to(run)
        parts = rel.parts
        for folder in ("policy", "adapter", "model", ".hydra", "tensorboard"):
            if folder in parts:
                out.add("/".join(parts[: parts.index(folder) + 1]) + "/")
                break
        else:
            if p.is_file():
                out.add(str(rel))
    return out


def _stage_files(i: int) -> set[str]:
    it = f"iter_{i:03d}"
    gen = {f"{it}/generate/shard_0000{k}.parquet" for k in range(4)}
    lab = {f"{it}/label/shard_0000{k}.parquet" for k in range(4)}
    pairs = {f"{it}/pairs/shard_0000{k}.parquet" for k in range(4)}  # one per generate shard
    samples = {
        f"{it}/evaluate/samples/shard_0000{k}.parquet" for k in range(4)
    }  # 16 held-out prompts
    # the KL constraint's samples of the held-out prompts (one round: the update was within
    # the target, no scaled adapter)
    samples |= {f"{it}/constrain/samples_0/shard_0000{k}.parquet" for k in range(4)}
    stages = ("prompts", "generate", "label", "pairs", "update", "constrain", "evaluate", "handoff")
    done = {f"{it}/{s}/{f}" for s in stages for f in ("_DONE.json", "_CONFIG.json")}
    planned = ("generate", "update", "evaluate/samples", "constrain/samples_0")
    plans = {f"{it}/{s}/_PLAN.json" for s in planned}
    return (
        gen
        | lab
        | pairs
        | samples
        | done
        | plans
        | {
            f"{it}/prompts/shard_00000.parquet",
            f"{it}/update/train_log.jsonl",
            f"{it}/update/adapter/",
            f"{it}/handoff/policy/",
            f"{it}/handoff/adapter/",
            f"{it}/handoff/kl.json",
            f"{it}/evaluate/scores/shard_00000.parquet",
        }
    )


EXPECTED_TOP = {
    ".lock",  # the run lock (runlock.py): held while a process writes here
    "config.yaml",
    "metrics.jsonl",
    "metrics.png",
    ".hydra/",
    "__main__.log",
    "_FINISHED.json",
    "tensorboard/",  # report_to=[tensorboard]
    "tracker.json",
    "heldout/initial_samples/_DONE.json",
    "heldout/initial_samples/_PLAN.json",
    "heldout/initial_samples/_CONFIG.json",
    "heldout/shard_00000.parquet",
    "heldout/_DONE.json",
    "heldout/_CONFIG.json",
    *(f"heldout/initial_samples/shard_0000{k}.parquet" for k in range(4)),
}


@pytest.fixture(scope="module")
def clean_run(tiny_cache, tiny_rm, tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("clean")
    t = time.time()
    out = cli(_args(tiny_cache, tiny_rm, runs, "iteration=2"))
    assert out.returncode == 0, out.stderr[-3000:]
    _CLEAN["transformers"] = (runs / "toy_tiny", time.time() - t)
    return runs / "toy_tiny"


def test_two_iterations_exact_run_tree(clean_run):
    assert _tree(clean_run) == EXPECTED_TOP | _stage_files(0) | _stage_files(1)
    rows = [json.loads(line) for line in (clean_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1]
    keys = {
        "iteration",
        "update",
        "prompts",
        "responses",
        "reward_mean",
        "reward_best_mean",
        "gold_mean",
        "win_rate_vs_initial",
        "correct_rate",
        "kl_to_reference",
        "response_tokens_mean",
        "eos_rate",
        "accepted",
        "seconds",
    }
    assert keys <= rows[0].keys()
    assert rows[0]["prompts"] == 16 and rows[0]["responses"] == 64
    assert set(rows[0]["seconds"]) == set(STAGES) - {"reward"}  # no refresh asked
    for r in rows:  # the share of right answers among the held-out samples, checked again
        t = read_shards(Paths(clean_run, "").evaluation_samples(r["iteration"]))
        right = world.correctness_reward(t["prompt"].to_pylist(), t["response"].to_pylist())
        assert r["correct_rate"] == pytest.approx(sum(right) / len(right), abs=1e-5)
        assert 0 <= r["initial_correct_rate"] <= 1
        # the gold judge's win rate and its length-controlled twin, computed again
        init = read_shards(clean_run / "heldout" / "initial_samples").to_pandas()
        both = t.to_pandas().merge(init, on=["prompt_id", "sample_idx"], suffixes=("", "_0"))
        gold = [
            world.gold_reward(both["prompt"].tolist(), both[c].tolist())
            for c in ("response", "response_0")
        ]
        fig = winrate.figures(
            winrate.judged(*gold),
            both["response"].str.len().tolist(),
            both["response_0"].str.len().tolist(),
            both["prompt_id"].tolist(),
        )
        assert r["win_rate_vs_initial"] == fig["win_rate"]
        assert (r["lc_win_rate"], r["win_rate_se"]) == (fig["lc_win_rate"], fig["win_rate_se"])
        assert r["length_ratio"] == round(fig["new_length"] / fig["reference_length"], 4)
    _assert_cards(clean_run, rows)
    # iteration 1 starts from iteration 0's handed-off policy
    gen1 = json.loads((clean_run / "iter_001" / "generate" / "_DONE.json").read_text())
    assert gen1["config"]["policy"].endswith("iter_000/handoff/policy")


def _assert_cards(run: Path, rows: list[dict]) -> None:
    """Each iteration's cards, for the policy and its adapter, parse as the hub parses them,
    name the metrics of their own complete row and only the settings DPO reads."""
    from huggingface_hub import ModelCard

    for row in rows:
        handoff = run / f"iter_{row['iteration']:03d}" / "handoff"
        for folder in ("policy", "adapter"):
            card = ModelCard.load(handoff / folder / "README.md")
            got = {r.metric_type: r.metric_value for r in card.data.eval_results}
            assert got["win_rate"] == row["win_rate_vs_initial"]
            assert got["kl"] == row["kl_to_reference"]
            assert card.data.library_name == ("transformers" if folder == "policy" else "peft")
            assert "dpo" in card.data.tags and card.data.base_model is None  # a local base
            assert f"| {row['iteration']} | dpo | 16 | 64 |" in card.text  # its own row, whole
            assert "beta=0.1" in card.text and "clip_range" not in card.text


def _assert_tracked(run: Path) -> None:
    """The TensorBoard events say what the run's files say, each step once: every line of
    every train_log.jsonl at the run's step, every metrics.jsonl number at its iteration,
    and a samples table per iteration."""
    events = tensorboard_events(run / "tensorboard")
    keys = [(tag, step) for tag, step, _ in events]
    assert len(keys) == len(set(keys)), "a step was logged twice"
    got = {(tag, step): v for tag, step, v in events}
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        i = row["iteration"]
        base = track.step_base(run, i)
        log = (run / f"iter_{i:03d}" / "update" / "train_log.jsonl").read_text().splitlines()
        assert len(log) == track.update_steps(run, i) > 0
        for line in map(json.loads, log):
            for k in ("loss", "grad_norm", "lr", "reward_margin", "reward_accuracy"):
                want = pytest.approx(line[k], rel=1e-5, abs=1e-6)  # the log keeps 6 decimals
                assert got[(f"train/{k}", base + line["step"])] == want
        for k in ("win_rate_vs_initial", "kl_to_reference", "reward_mean", "gold_mean"):
            assert got[(f"iteration/{k}", i)] == pytest.approx(row[k], 1e-6)
        assert got[("iteration/accepted", i)] == float(row["accepted"])
        assert got[("iteration/seconds/update", i)] == pytest.approx(row["seconds"]["update"])
        assert "| best 1 |" in got[("iteration/samples/text_summary", i)]
    assert max(step for tag, step in keys if tag == "train/loss") == track.step_base(run, 2)


def test_tracked_run_reads_back_from_tensorboard(clean_run):
    _assert_tracked(clean_run)
    best = runinfo.extremes(runinfo.scored(clean_run, 1), 2)
    assert [r["rank"] for r in best] == ["best 1", "best 2", "worst 2", "worst 1"]
    assert best[0]["reward"] >= best[1]["reward"] >= best[2]["reward"] >= best[3]["reward"]
    labels = pq.read_table(clean_run / "iter_001" / "label").to_pandas()
    assert best[0]["reward"] == pytest.approx(labels["reward"].max(), abs=1e-4)


def test_the_console_script_shows_a_run(clean_run):
    """``iterate show RUN samples=K`` (the installed console script): the stages, the
    metrics table and the ranked samples of the last iteration."""
    script = Path(sys.executable).parent / "iterate"
    out = subprocess.run([script, "show", clean_run, "samples=2"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "finished" in out.stdout.splitlines()[0] and "iter 1:" in out.stdout
    assert "handoff          done" in out.stdout and "win rate" in out.stdout
    assert "iteration 1: the best and worst 2 best-of-n" in out.stdout
    assert out.stdout.count("[best ") == 2 and out.stdout.count("[worst ") == 2
    bad = subprocess.run([script, "show", clean_run, "sample=2"], capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown argument 'sample=2'" in bad.stderr


def test_rerun_of_finished_run_does_nothing(clean_run, tiny_cache, tiny_rm):
    before = {
        p: p.stat().st_mtime_ns
        for p in clean_run.rglob("*")
        if p.is_file() and ".hydra" not in p.parts and p.suffix != ".log" and p.name != ".lock"
    }
    out = cli(_args(tiny_cache, tiny_rm, clean_run.parent, "iteration=2"))
    assert out.returncode == 0, out.stderr[-2000:]
    said = out.stdout + out.stderr
    assert "nothing to do" in said
    assert "generate" not in said.split("nothing to do")[0]  # no engine, no stage ran
    after = {p: p.stat().st_mtime_ns for p in before}
    assert after == before


def _rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def test_crash_and_rerun_gives_the_same_shards(clean_run, tiny_cache, tiny_rm, tmp_path):
    args = _args(tiny_cache, tiny_rm, tmp_path, "iteration=2")
    run = tmp_path / "toy_tiny"
    kills = (
        ("1:generate:2", "generate"),
        ("1:label:2", "label"),
        ("1:label:3:TERM", "label"),  # SIGTERM (a scheduler's): a clean stop, status 143
        ("1:update:1", "update"),
        ("1:evaluate:2", "evaluate"),
    )
    ident = None
    for point, partial in kills:
        out = cli(args, env={"ITERATE_KILL_AT": point})
        term = point.endswith(":TERM")
        assert out.returncode == (143 if term else -signal.SIGKILL), (point, out.stderr[-2000:])
        if term:
            said = out.stdout + out.stderr
            assert "terminated (SIGTERM): the same command resumes" in said
            assert "Traceback" not in said
            assert json.loads((run / "_STOPPED.json").read_text())["status"] == 143
            assert "terminated (SIGTERM) (exit 143)" in show.status(run)
        stage = run / "iter_001" / partial
        assert stage.exists() and not (stage / "_DONE.json").exists(), f"killed during {partial}"
        # the inspector names the partial stage and how far it got
        k = int(point.split(":")[2])
        unit, total = ("steps", 3) if partial == "update" else ("shards", 4)
        assert f"{partial:<17}partial ({unit} {k} of {total})" in show.status(run)
        ident = ident or json.loads((run / "tracker.json").read_text())["id"]
        assert json.loads((run / "tracker.json").read_text())["id"] == ident  # the same run
        if partial != "update":  # the shards written before the kill stay
            shards = list(stage.glob("shard_*.parquet")) or list(stage.glob("samples/shard_*"))
            assert len(shards) == k
    out = cli(args)
    assert out.returncode == 0, out.stderr[-2000:]
    _assert_same_run(run, clean_run)
    _assert_tracked(run)  # the steps logged before the kill of the update are not logged again
    assert "finished" in show.status(run).splitlines()[0]


def _assert_same_run(run: Path, clean_run: Path) -> None:
    """The same shards, files and metrics as the uninterrupted run's."""
    for shard in sorted(clean_run.rglob("shard_*.parquet")):
        rel = shard.relative_to(clean_run)
        assert _rows(run / rel) == _rows(shard), rel
    assert _tree(run) == _tree(clean_run)
    strip = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
    metrics = [strip(json.loads(line)) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics == [
        strip(json.loads(line)) for line in (clean_run / "metrics.jsonl").read_text().splitlines()
    ]


# The kill campaign: each trial stops a 2-iteration run at a seeded random moment of its
# uninterrupted duration (wherever it is: engine start, a shard, a step, a save) in one of
# three ways: SIGKILL to the whole process group, SIGTERM to it (a scheduler's: a clean
# stop, 143), or SIGKILL to the vLLM engine process alone (the run fails, 1, or restarts
# the engine if it was between requests). It checks that no process of the group survives,
# reruns the same command to the end and compares shards, files and metrics with the
# uninterrupted run's. `make test` runs one transformers SIGKILL trial;
# ITERATE_KILL_TRIALS=N runs N, cycling through the backends and ways (the campaign
# reported in the notes).
CAMPAIGN = int(os.environ.get("ITERATE_KILL_TRIALS", "0"))
WAYS = [
    ("transformers", "kill"),
    ("vllm", "kill"),
    ("transformers", "term"),
    ("vllm", "term"),
    ("vllm", "engine"),
]
TRIALS = [(t, *WAYS[t % len(WAYS)]) for t in range(CAMPAIGN)] if CAMPAIGN else [(0, *WAYS[0])]
STATUS = {"kill": {-signal.SIGKILL}, "term": {143, -signal.SIGTERM}, "engine": {1, 0}}
_CLEAN: dict[str, tuple[Path, float]] = {}


def _clean(backend: str, tiny_cache, tiny_rm, tmp_path_factory) -> tuple[Path, float]:
    """The uninterrupted run of a backend and its duration, made once per module (the
    transformers one is ``clean_run``)."""
    if backend not in _CLEAN:
        runs = tmp_path_factory.mktemp(backend)
        t = time.time()
        out = cli(_args(tiny_cache, tiny_rm, runs, "iteration=2", backend=backend))
        assert out.returncode == 0, out.stderr[-3000:]
        _CLEAN[backend] = (runs / "toy_tiny", time.time() - t)
    return _CLEAN[backend]


def _group(pgid: int) -> list[int]:
    """Processes still in process group ``pgid``."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


def _engines(pgid: int) -> list[int]:
    """The vLLM engine processes in process group ``pgid``."""
    found = []
    for pid in _group(pgid):
        try:
            if b"iterate.sampling.engine" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            continue
    return found


@pytest.mark.parametrize(
    ("trial", "backend", "way"), TRIALS, ids=[f"{b}-{w}-{t}" for t, b, w in TRIALS]
)
def test_kill_at_a_seeded_random_moment_then_rerun(
    trial, backend, way, clean_run, tiny_cache, tiny_rm, tmp_path, tmp_path_factory
):
    reference, duration = _clean(backend, tiny_cache, tiny_rm, tmp_path_factory)
    at = round(random.Random(trial).uniform(0.5, duration), 2)
    args = _args(tiny_cache, tiny_rm, tmp_path, "iteration=2", backend=backend)
    proc = subprocess.Popen(
        [sys.executable, "-m", "iterate", *args],
        cwd=ROOT,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        proc.wait(timeout=at)
    except subprocess.TimeoutExpired:
        if way == "engine":
            for pid in _engines(proc.pid):
                os.kill(pid, signal.SIGKILL)
        else:
            os.killpg(proc.pid, signal.SIGKILL if way == "kill" else signal.SIGTERM)
        proc.wait(timeout=300)
        assert proc.returncode in STATUS[way], (at, proc.returncode)
    deadline = time.time() + 20  # a killed engine with a large KV cache takes a while to go
    while _group(proc.pid) and time.time() < deadline:
        time.sleep(0.2)
    assert not _group(proc.pid), f"a process outlived the kill at {at}s"
    out = cli(args)
    assert out.returncode == 0, (at, out.stderr[-2000:])
    _assert_same_run(tmp_path / "toy_tiny", reference)
    with open(os.environ.get("ITERATE_KILL_TALLY", os.devnull), "a") as tally:
        tally.write(
            json.dumps(
                {
                    "trial": trial,
                    "backend": backend,
                    "way": way,
                    "at_s": at,
                    "of_s": round(duration, 1),
                    "status": proc.returncode,
                    "ok": True,
                }
            )
            + "\n"
        )


def test_killed_two_process_update_resumes(tiny_cache, tiny_rm, tmp_path):
    """A multi-process update killed at its second step (every rank with it) starts again
    on the rerun, as a single-process one does: a fresh log, rank 0's adapter, no rank left."""
    args = _args(tiny_cache, tiny_rm, tmp_path, "iteration=1", "update.num_processes=2")
    out = cli(args, env={"ITERATE_KILL_AT": "0:update:2"})
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    update = tmp_path / "toy_tiny" / "iter_000" / "update"
    assert not (update / "_DONE.json").exists() and (update / "launch.json").exists()
    time.sleep(1)  # the ranks die with their launcher (PR_SET_PDEATHSIG)
    ranks = [p for p in Path("/proc").glob("[0-9]*/cmdline") if _is_rank(p, update)]
    assert not ranks, "a rank outlived the killed run"
    out = cli(args)
    assert out.returncode == 0, out.stderr[-3000:]
    done = json.loads((update / "_DONE.json").read_text())
    assert done["processes"] == 2 and done["steps"] >= 2
    log = (update / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == list(range(1, done["steps"] + 1))
    assert (update / "adapter" / "adapter_model.safetensors").exists()


def _is_rank(cmdline: Path, update: Path) -> bool:
    try:
        return str(update) in cmdline.read_bytes().decode(errors="ignore")
    except OSError:  # the process ended meanwhile
        return False


# a budget nothing meets, the update judged whole (no KL constraint to take it part of the way)
REJECT_ALL = ("iteration=2", "handoff.max_kl=1e-9", "update.lr=2e-2", "handoff.constrain=false")


def _cfg(tiny_cache, tiny_rm, tmp_path, *extra):
    return compose_cfg(_args(tiny_cache, tiny_rm, tmp_path, *extra))


def test_tiny_max_kl_rejects_and_stops(tiny_cache, tiny_rm, tmp_path):
    cfg = _cfg(tiny_cache, tiny_rm, tmp_path, *REJECT_ALL, "handoff.on_reject=stop")
    rows = loop.run(cfg, tmp_path / "toy_tiny")
    run = tmp_path / "toy_tiny"
    kl = json.loads((run / "iter_000" / "handoff" / "kl.json").read_text())
    assert kl["k1"] > 1e-9 and kl["accepted"] is False
    assert kl["decision"] == f"reject (stop): KL {kl['k1']:.4g} > 1e-09"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["accepted"] for m in metrics] == [False] and rows[0]["accepted"] is False
    assert not (run / "iter_001").exists(), "the loop stopped at the rejection"
    assert loop.is_finished(cfg, Paths(run=run, base_policy=""))


def test_keep_previous_restarts_from_the_previous_policy(tiny_cache, tiny_rm, tiny_world, tmp_path):
    cfg = _cfg(tiny_cache, tiny_rm, tmp_path, *REJECT_ALL, "handoff.on_reject=keep_previous")
    rows = loop.run(cfg, tmp_path / "toy_tiny")
    assert [r["accepted"] for r in rows] == [False, False]
    gen1 = json.loads((tmp_path / "toy_tiny" / "iter_001" / "generate" / "_DONE.json").read_text())
    assert gen1["config"]["policy"] == str(tiny_world)
    card = (tmp_path / "toy_tiny" / "iter_001" / "handoff" / "adapter" / "README.md").read_text()
    assert "to put on the initial policy" in card and "rejected" in card  # not iteration 0's
    assert str(tiny_world) not in card  # no path of this machine in a card for the hub


def test_a_moved_run_resumes_without_redoing_anything(clean_run, tiny_cache, tiny_rm, tmp_path):
    moved = tmp_path / "elsewhere" / "toy_tiny"
    shutil.copytree(clean_run, moved)
    before = {p: p.read_text() for p in moved.rglob("_DONE.json")}
    gen = json.loads((moved / "iter_001" / "generate" / "_DONE.json").read_text())
    assert gen["config"]["policy"] == "${run}/iter_000/handoff/policy"  # not where it ran
    out = cli(_args(tiny_cache, tiny_rm, moved.parent, "iteration=2"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert {p: p.read_text() for p in moved.rglob("_DONE.json")} == before, "nothing redone"


def _done_files(run: Path) -> dict:
    return {str(p.relative_to(run)): p.read_text() for p in run.rglob("_DONE.json")}


def test_a_damaged_shard_is_named_and_force_redoes_only_it(
    clean_run, tiny_cache, tiny_rm, tmp_path
):
    run = tmp_path / "toy_tiny"
    shutil.copytree(clean_run, run)
    shard = run / "iter_001" / "label" / "shard_00001.parquet"
    shard.write_bytes(shard.read_bytes()[:100])  # truncated, after the stage finished
    before = _done_files(run)
    out = cli(_args(tiny_cache, tiny_rm, tmp_path, "iteration=2"))
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"{shard} has 100 bytes" in out.stdout + out.stderr
    out = cli(_args(tiny_cache, tiny_rm, tmp_path, "iteration=2", "force=true"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert _rows(shard) == _rows(clean_run / shard.relative_to(run))
    after = _done_files(run)
    redone = {k for k in before if before[k] != after[k]}
    assert redone == {"iter_001/label/_DONE.json"}, "the same labels: the stages after it stand"


def test_a_deleted_done_file_is_not_hidden_by_nothing_to_do(
    clean_run, tiny_cache, tiny_rm, tmp_path
):
    run = tmp_path / "toy_tiny"
    shutil.copytree(clean_run, run)
    (run / "iter_001" / "pairs" / "_DONE.json").unlink()
    out = cli(_args(tiny_cache, tiny_rm, tmp_path, "iteration=2"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "nothing to do" not in out.stdout + out.stderr
    pairs = json.loads((run / "iter_001" / "pairs" / "_DONE.json").read_text())
    assert (
        pairs["files"]
        and _done_files(run)["iter_001/update/_DONE.json"]
        == _done_files(clean_run)["iter_001/update/_DONE.json"]
    ), "the same pairs again: the update stands"


def _finished_here(clean_run: Path, runs: Path) -> Path:
    """A copy of the clean run in ``runs``, recorded as finished there (so a rerun with
    ``runs_dir`` = ``runs`` is one of the very config that finished it)."""
    run = runs / "toy_tiny"
    shutil.copytree(clean_run, run)
    fin = json.loads((run / "_FINISHED.json").read_text())
    fin["config"]["runs_dir"] = str(runs)
    (run / "_FINISHED.json").write_text(json.dumps(fin))
    return run


def test_a_stage_folder_deleted_while_the_run_went_on_is_redone(
    clean_run, tiny_cache, tiny_rm, tmp_path
):
    """The finished-run check knows the stages from the config, not from what was there at
    the end: a folder deleted before the end (so not listed) is still missed and redone."""
    run = _finished_here(clean_run, tmp_path)
    shutil.rmtree(run / "iter_000" / "generate")
    fin = json.loads((run / "_FINISHED.json").read_text())
    fin["stages"] = [s for s in fin["stages"] if s != "iter_000/generate"]  # as it was listed
    (run / "_FINISHED.json").write_text(json.dumps(fin))
    out = cli(_args(tiny_cache, tiny_rm, tmp_path, "iteration=2"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "nothing to do" not in out.stdout + out.stderr
    assert _rows(run / "iter_000" / "generate" / "shard_00000.parquet") == _rows(
        clean_run / "iter_000" / "generate" / "shard_00000.parquet"
    )
    after, clean = _done_files(run), _done_files(clean_run)
    assert {k for k in clean if clean[k] != after[k]} == {"iter_000/generate/_DONE.json"}


def test_deleted_metrics_plot_and_card_of_a_finished_run_are_written_again(
    clean_run, tiny_cache, tiny_rm, tmp_path
):
    run = _finished_here(clean_run, tmp_path)
    card = run / "iter_001" / "handoff" / "policy" / "README.md"
    for made in (run / "metrics.jsonl", run / "metrics.png", card):
        made.unlink()
    out = cli(_args(tiny_cache, tiny_rm, tmp_path, "iteration=2"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "nothing to do" not in out.stdout + out.stderr
    assert (run / "metrics.png").exists() and card.read_text() == (
        clean_run / card.relative_to(run)
    ).read_text()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    clean = [json.loads(x) for x in (clean_run / "metrics.jsonl").read_text().splitlines()]
    assert rows == clean, "the same rows, from the same stages"
    assert _done_files(run) == _done_files(clean_run), "no stage redone"


def test_changed_config_is_refused_naming_the_key(clean_run, tiny_cache, tiny_rm):
    out = cli(_args(tiny_cache, tiny_rm, clean_run.parent, "iteration=2", "update.beta=0.5"))
    assert out.returncode != 0
    said = out.stdout + out.stderr
    assert "update.beta" in said and "changed since it ran" in said


def test_multirun_sweeps_update_rules(tiny_cache, tiny_rm, tmp_path):
    out = cli(["-m", *_args(tiny_cache, tiny_rm, tmp_path, "update=dpo,raft", "iteration=1")])
    assert out.returncode == 0, out.stderr[-3000:]
    sweep = tmp_path / "toy_tiny"
    jobs = {
        json.loads(p.read_text().splitlines()[0])["update"]: p.parent
        for p in sweep.glob("*/metrics.jsonl")
    }
    assert sorted(jobs) == ["dpo", "raft"]  # one folder per job, named by its overrides
    assert all("/" not in p.name and len(p.name.encode()) <= 200 for p in jobs.values())
    assert (sweep / "summary.md").exists() and (sweep / "summary.png").exists()
    summary = (sweep / "summary.md").read_text()
    assert "| raft |" in summary and "| dpo |" in summary
    raft_pairs = pq.read_table(jobs["raft"] / "iter_000" / "pairs" / "shard_00000.parquet")
    assert raft_pairs.num_rows > 0 and set(raft_pairs["rejected"].to_pylist()) == {None}


def test_a_sweep_runs_on_past_a_refused_job_and_names_it(tiny_cache, tiny_rm, tmp_path):
    """Each job refused (a pair rule with one sample per prompt): the sweep still reaches
    the second job, names both, and exits 2."""
    out = cli(["-m", *_args(tiny_cache, tiny_rm, tmp_path, "update=dpo,raft", "generate.n=1")])
    said = out.stdout + out.stderr
    assert out.returncode == 2, said[-3000:]
    for rule in ("dpo", "raft"):
        assert f"update={rule} needs >= 2 samples" in said
    jobs = [p for p in (tmp_path / "toy_tiny").iterdir() if p.is_dir()]
    assert len(jobs) == 2
    assert {m.group(1) for m in re.finditer(r"job (\S+) stopped: bad input \(exit 2", said)} == {
        p.name for p in jobs
    }


def test_submitit_local_launcher_runs_a_sweeps_job(tiny_cache, tiny_rm, tmp_path):
    """The cluster path on this machine: hydra-submitit-launcher's local executor runs the
    sweep's job in a process of its own, as SLURM would on a node. (One job: that a sweep's
    jobs each get their folder and the summary is test_multirun_sweeps_update_rules'.)"""
    args = _args(tiny_cache, tiny_rm, tmp_path, "update=raft", "iteration=1")
    out = cli(["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=30", *args])
    assert out.returncode == 0, out.stderr[-3000:]
    sweep = tmp_path / "toy_tiny"
    finished = [json.loads(p.read_text()) for p in sweep.glob("*/_FINISHED.json")]
    assert [(f["config"]["update"]["name"], f["iterations"]) for f in finished] == [("raft", 1)]
    assert list((sweep / ".submitit").glob("*/*_result.pkl")), "submitit ran the job"
    assert "| raft |" in (sweep / "summary.md").read_text()


def test_sweep_labels_keep_only_the_overrides_that_differ():
    from iterate.report.sweep import short_labels

    names = ["reward.train=False,update=dpo", "reward.train=False,update=raft"]
    assert short_labels(names) == {names[0]: "update=dpo", names[1]: "update=raft"}
    assert short_labels(["update=dpo"]) == {"update=dpo": "update=dpo"}


def test_an_alpacaeval_reference_file_and_judges_of_ones_own(tiny_cache, tiny_rm, tmp_path):
    """The AlpacaEval path end to end: held-out prompts from a file in its format
    (prompts.heldout_path), the new policy compared with that file's reference outputs
    (evaluate.reference.kind=file) by the gold judge, the reward model and a judge named in
    evaluate.judges; every judge's raw and length-controlled win rates reported, the gold
    judge's equal to a computation from the evaluation's samples and the file."""
    data = ROOT / "data" / "toy_alpaca_eval.json"
    judge = "{kind: function, function: 'iterate.toy.world:correctness_reward', name: correct}"
    cfg = _cfg(
        tiny_cache,
        tiny_rm,
        tmp_path,
        f"prompts.heldout_path={data}",
        "prompts.heldout_field=instruction",
        "evaluate.reference.kind=file",
        f"evaluate.reference.path={data}",
        f"evaluate.judges=[{judge}]",
        "threads=1",
    )
    before = torch.get_num_threads()
    seen = []
    real = torch.set_num_threads
    with pytest.MonkeyPatch.context() as mp:  # the run's torch threads, set once at start
        mp.setattr(torch, "set_num_threads", lambda n: (seen.append(n), real(n)))
        [row] = loop.run(cfg, tmp_path / "toy_tiny")
    assert seen == [1, before] and torch.get_num_threads() == before
    run = tmp_path / "toy_tiny"
    outputs = {r["instruction"]: r["output"] for r in json.loads(data.read_text())}
    held = read_shards(run / "heldout")["prompt"].to_pylist()
    assert len(held) == 16 and set(held) <= set(outputs)
    ev = json.loads((run / "iter_000" / "evaluate" / "_DONE.json").read_text())
    assert ev["reference"] == {"kind": "file", "prompts": 16, "unreferenced": 0}
    assert set(ev["judges"]) == {"reward", "gold", "correct"}
    for figures in ev["judges"].values():
        assert 0 <= figures["win_rate"] <= 1 and figures["pairs"] == 64
        assert "lc_win_rate" in figures and "lc_win_rate_se" in figures
    samples = read_shards(run / "iter_000" / "evaluate" / "samples")
    pairs = list(zip(samples["prompt"].to_pylist(), samples["response"].to_pylist()))
    prefs = [
        winrate.preference(world.gold_score(p, r), world.gold_score(p, outputs[p]))
        for p, r in pairs
    ]
    lengths = [len(r) for _, r in pairs], [len(outputs[p]) for p, _ in pairs]
    by = samples["prompt_id"].to_pylist()  # a prompt's 4 samples against its one reference
    assert ev["judges"]["gold"] == winrate.figures(prefs, *lengths, by)
    assert row["reference"] == "file" and row["main_judge"] == "gold"
    assert row["win_rate"] == ev["judges"]["gold"]["win_rate"]
    assert row["judge_win_rates"]["correct"]["win_rate"] == ev["judges"]["correct"]["win_rate"]
    card = (run / "iter_000" / "handoff" / "adapter" / "README.md").read_text()
    assert "win rate vs reference outputs (toy_alpaca_eval.json) (gold)" in card
    assert " win rate  vs file  LC " in metrics.table([row])  # its own column, printed
    reward_judged = {**row, "main_judge": "reward"}  # a judge other than gold: named
    assert " win rate  vs file (reward)  LC " in metrics.table([reward_judged])
    no_gold = {**reward_judged, "reference": "initial", "win_rate_vs_initial": None}
    assert " win rate (reward)  LC " in metrics.table([no_gold])
