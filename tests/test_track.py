"""Experiment trackers: every backend resumes the same tracker run and logs a step once;
an iteration's row and samples table are logged once; a redone update is logged anew and a
tracker added later is caught up; what the trackers get is read back (TensorBoard event
files, trackio's store, W&B's offline run folders)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from iterate import track
from iterate.report import runinfo
from iterate.store.paths import Paths

from .conftest import compose_cfg, tensorboard_events


def _run(tmp_path: Path, *overrides: str):
    cfg = compose_cfg(["experiment=toy_tiny", *overrides])
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    (run / "config.yaml").write_text("run_name: toy_tiny\n")
    return cfg, run


def _steps(n: int) -> list[dict]:
    return [{"step": s, "epoch": 0, "loss": 1.0 / s, "skipped": False} for s in range(1, n + 1)]


def _loss(run: Path) -> list[tuple[int, float]]:
    return [(s, v) for tag, s, v in tensorboard_events(run / "tensorboard") if tag == "train/loss"]


def test_flat_keeps_numbers_joins_nesting_and_counts_booleans():
    row = {"a": 1, "b": {"c": 2.5, "d": "x"}, "ok": True, "none": None, "name": "dpo"}
    assert track.flat(row) == {"a": 1.0, "b/c": 2.5, "ok": 1.0}


def test_no_tracker_asked_writes_nothing(tmp_path):
    cfg, run = _run(tmp_path)
    with track.Tracker(cfg, run) as tr:
        assert tr.steps(0, "u", 0, _steps(3)) == 0
    assert not (run / track.STATE).exists() and not (run / "tensorboard").exists()


def test_a_resumed_run_continues_each_tracker_run_and_logs_a_step_once(tmp_path):
    """Two sessions, as a killed update and its rerun make: the second is handed steps the
    first logged and logs only the new ones, into the same tracker run."""
    from trackio.sqlite_storage import SQLiteStorage

    cfg, run = _run(tmp_path, "report_to=[tensorboard,wandb,trackio]", "track.project=t1")
    with track.Tracker(cfg, run) as tr:
        assert tr.steps(1, "u", 10, _steps(2)) == 2
    ident = json.loads((run / track.STATE).read_text())["id"]
    with track.Tracker(cfg, run) as tr:
        assert tr.steps(1, "u", 10, _steps(4)) == 2  # steps 3 and 4 only
    cursor = {"1": {"update": "u", "step": 4, "row": False}}
    assert json.loads((run / track.STATE).read_text()) == {
        "id": ident,
        "trackers": {n: cursor for n in ("tensorboard", "wandb", "trackio")},
    }
    assert _loss(run) == [(11, 1.0), (12, 0.5), (13, pytest.approx(1 / 3)), (14, 0.25)]
    logs = SQLiteStorage.get_logs("t1", ident)
    assert [(r["step"], r["train/loss"]) for r in logs] == [
        (11, 1.0),
        (12, 0.5),
        (13, 1 / 3),
        (14, 0.25),
    ]
    wandb_runs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 2 and all(f"-{ident}" in p.name for p in wandb_runs)


def test_a_redone_update_is_logged_anew_and_a_tracker_added_later_is_caught_up(tmp_path):
    from trackio.sqlite_storage import SQLiteStorage

    cfg, run = _run(tmp_path, "report_to=[tensorboard]")
    with track.Tracker(cfg, run) as tr:
        tr.steps(0, "u", 0, _steps(2))
    with track.Tracker(cfg, run) as tr:  # force=true redid the update: another config hash
        assert tr.steps(0, "v", 0, _steps(1)) == 1
    assert [s for s, _ in _loss(run)] == [1, 2, 1]
    more, _ = _run(tmp_path, "report_to=[tensorboard,trackio]", "track.project=t2")
    with track.Tracker(more, run) as tr:  # trackio joins: it gets what it missed, alone
        assert tr.steps(0, "v", 0, _steps(2)) == 2
    assert [s for s, _ in _loss(run)] == [1, 2, 1, 2]
    ident = json.loads((run / track.STATE).read_text())["id"]
    assert [r["step"] for r in SQLiteStorage.get_logs("t2", ident)] == [1, 2]


def test_an_iteration_is_caught_up_and_logged_once(tmp_path):
    """The iteration's end logs the steps its update's log holds that were not logged live,
    then the row and the samples table; a second call (a rerun) adds nothing."""
    cfg, run = _run(tmp_path, "report_to=[tensorboard]")
    paths = Paths(run=run, base_policy="")
    for i, n in ((0, 3), (1, 2)):
        update = paths.stage(i, "update")
        update.mkdir(parents=True)
        (update / "_DONE.json").write_text(json.dumps({"steps": n, "config_hash": f"h{i}"}))
        (update / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _steps(n)))
    with track.Tracker(cfg, run) as tr:
        tr.steps(1, "h1", track.step_base(run, 1), _steps(1))  # logged live before a kill
    row = {
        "iteration": 1,
        "update": "dpo",
        "win_rate_vs_initial": 0.75,
        "accepted": False,
        "seconds": {"update": 2.0},
    }
    asked = []

    def samples(k: int):  # the loop's: the held-out responses' extremes, asked for once
        asked.append(k)
        return runinfo.extremes(runinfo.scored(run, 1, True, keep=k), k)

    for logged in (True, False):
        with track.Tracker(cfg, run) as tr:
            assert tr.iteration(paths, row, samples) is logged
    assert asked == [cfg.track.samples]
    events = tensorboard_events(run / "tensorboard")
    assert sorted(s for tag, s, _ in events if tag == "train/loss") == [4, 5]  # 3 + (1, 2)
    got = {tag: (s, v) for tag, s, v in events if tag.startswith("iteration/")}
    assert got["iteration/win_rate_vs_initial"] == (1, 0.75)
    assert got["iteration/accepted"] == (1, 0.0) and got["iteration/seconds/update"] == (1, 2.0)
    assert got["iteration/samples/text_summary"] == (1, "(no samples)")  # none on disk
    assert len([e for e in events if e[0].startswith("iteration/")]) == len(got)


def test_the_samples_shown_are_read_shard_by_shard_and_are_the_same(tmp_path):
    """``scored(..., keep=k)`` keeps each samples shard's k best and worst rows only, and
    the best and worst k it gives are those of the whole iteration, ties and unscored rows
    included; the scores may be one shard for several samples shards (the evaluation's)."""
    import pyarrow as pa

    from iterate.report import runinfo
    from iterate.store.paths import Paths
    from iterate.store.shards import SCHEMAS, shard_path, write_shard

    paths = Paths(run=tmp_path, base_policy="p")
    rewards = [[0.5, 2.0, 0.5, None, -1.0], [2.0, 0.5, 0.1, 3.0], [-1.0, 0.5, 2.0, 0.5, 0.5, 0.0]]
    labels = []
    for k, rs in enumerate(rewards):
        n = len(rs)
        gen = {
            "prompt_id": [f"p{k}"] * n,
            "sample_idx": list(range(n)),
            "prompt": [f"Q{k}"] * n,
            "response": [f"r{k}.{j}" for j in range(n)],
            "prompt_tokens": [1] * n,
            "response_tokens": [2] * n,
            "finish_reason": ["stop"] * n,
            "response_ids": [[1]] * n,
        }
        write_shard(
            pa.table(gen, schema=SCHEMAS["generate"]), shard_path(paths.stage(0, "generate"), k)
        )
        labels += [
            {"prompt_id": f"p{k}", "sample_idx": j, "reward": r, "gold": None, "reward_std": None}
            for j, r in enumerate(rs)
        ]
    write_shard(
        pa.Table.from_pylist(labels, schema=SCHEMAS["label"]),
        shard_path(paths.stage(0, "label"), 0),
    )
    whole = runinfo.scored(tmp_path, 0)
    assert len(whole) == sum(map(len, rewards)) and whole.attrs["which"] == "best-of-n"
    for k in (1, 2, 3, 10):
        kept = runinfo.scored(tmp_path, 0, keep=k)
        assert len(kept) <= min(len(whole), 3 * 2 * k)
        assert runinfo.extremes(kept, k) == runinfo.extremes(whole, k), k
    best = runinfo.extremes(runinfo.scored(tmp_path, 0, keep=2), 2)
    assert [(r["rank"], r["response"]) for r in best] == [
        ("best 1", "r1.3"),
        ("best 2", "r0.1"),
        ("worst 2", "r0.4"),
        ("worst 1", "r2.0"),
    ]
