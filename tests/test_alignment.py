"""The levers against reward over-optimisation (issue 13): reward-model ensembles, the
reward-model refresh between iterations, the proxy-gold gap, and sweep summaries over
seeds."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from iterate import rewards
from iterate.report import sweep
from iterate.rewards import scorer as scoring
from iterate.stages import reward as refresh
from iterate.stages import reward_model
from iterate.store.paths import Paths
from iterate.toy import world

from .conftest import TINY, cli, compose_cfg


def test_aggregate_hand_computed():
    r = torch.tensor([[1.0, 2.0], [3.0, 6.0]])  # 2 members x 2 conversations
    assert scoring.aggregate(r, "mean").tolist() == [2.0, 4.0]
    # population std: [1, 2]; mean - 0.5 * std
    assert scoring.aggregate(r, "mean_minus_std", 0.5).tolist() == [1.5, 3.0]
    assert scoring.aggregate(r, "min").tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match="median"):
        scoring.aggregate(r, "median")


def test_ensemble_trains_members_scores_their_aggregate_and_resumes(tiny_cfg, tiny_world):
    tiny_cfg.reward.ensemble, tiny_cfg.reward.aggregate = 2, "mean_minus_std"
    tiny_cfg.reward.uncertainty_coef = 0.5
    tiny_cfg.reward.cache = False  # the resume below must train, not reuse
    paths = Paths(run=Path(tiny_cfg.runs_dir) / "e", base_policy=str(tiny_world), toy=tiny_world)
    done = reward_model.train(tiny_cfg, paths)
    out = paths.reward_model_dir / "model"
    index = json.loads((out / "ensemble.json").read_text())
    assert index["members"] == ["member_0", "member_1"] and len(index["offsets"]) == 2
    assert [m["member"] for m in done["members"]] == [0, 1]
    # each member learnt the toy preferences (0.67 and 0.70 measured; a sign slip gives < 0.5)
    assert all(m["heldout_accuracy"] > 0.55 for m in done["members"])
    log = [json.loads(line) for line in (paths.reward_model_dir / "train_log.jsonl").open()]
    assert {r["member"] for r in log} == {0, 1} and len(log) == done["steps"]
    # members differ (seed and bootstrap sample), so their spread is not zero
    w0, w1 = (scoring.load_model(str(out / m))[0].score.weight for m in ("member_0", "member_1"))
    assert not torch.equal(w0, w1)

    # the ensemble's reward and spread are its centred members' mean - 0.5 std and std
    prompts = ["Greet Anna.", "What is 2 plus 3?", "Count from 1 to 3."]
    responses = ["Hello Anna!", "Ugh, 2 plus 3 is 7. Stop asking.", "Sure! 1, 2, 3."]
    scorer = rewards.of(tiny_cfg, path=str(out))
    got, spread, parts, _ = scorer.score(prompts, responses, detail=True)
    assert parts == {}, "one source"
    single = [
        torch.tensor(scoring.Scorer.load(str(out / m), "float32", 256, 8).score(prompts, responses))
        - off
        for m, off in zip(index["members"], index["offsets"])
    ]
    r = torch.stack(single)
    std = r.std(0, unbiased=False)
    assert torch.allclose(torch.tensor(got), r.mean(0) - 0.5 * std, atol=1e-5)
    assert torch.allclose(torch.tensor(spread), std, atol=1e-5) and (std > 0).all()

    # an interrupted ensemble stage trains only the member it had not saved
    kept = (out / "member_0" / "member.json").stat().st_mtime_ns
    (paths.reward_model_dir / "_DONE.json").unlink()
    shutil.rmtree(out / "member_1")
    again = reward_model.train(tiny_cfg, paths)
    assert (out / "member_0" / "member.json").stat().st_mtime_ns == kept
    assert (out / "member_1" / "member.json").exists()
    assert again["heldout_accuracy"] == done["heldout_accuracy"]  # the same seeds and samples


def _refresh_args(tiny_cache, tiny_rm, runs, *extra) -> list[str]:
    return [
        *TINY,
        f"runs_dir={runs}",
        f"toy.cache_dir={tiny_cache}",
        "generate=transformers",
        "reward.train=false",
        f"reward.path={tiny_rm}",
        "generate.n=8",
        "reward.refresh.pairs=16",
        "iteration=2",
        *extra,
    ]


@pytest.fixture(scope="module")
def refresh_run(tiny_cache, tiny_rm, tmp_path_factory) -> Path:
    """A 2-iteration run with a refresh each iteration, killed once after iteration 0's
    judged pairs were written, then finished by a rerun."""
    runs = tmp_path_factory.mktemp("refresh")
    args = _refresh_args(tiny_cache, tiny_rm, runs)
    out = cli(args, env={"ITERATE_KILL_AT": "0:reward:1"})
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    run = runs / "toy_tiny"
    judged = run / "iter_000" / "reward" / "pairs.parquet"
    assert judged.exists() and not (judged.parent / "_DONE.json").exists()
    written = judged.stat().st_mtime_ns
    out = cli(args)
    assert out.returncode == 0, out.stderr[-3000:]
    assert judged.stat().st_mtime_ns == written, "the rerun did not judge again"
    return run


def _proxy_win_rate(run: Path, i: int) -> float:
    """The held-out win rate of iteration i's policy over the initial one by the reward
    model that labelled it (the refreshed one), computed again from the stored samples."""
    import yaml

    from iterate.store.shards import read_shards
    from iterate.winrate import judged

    rc = yaml.safe_load((run / "config.yaml").read_text())["reward"]
    label = json.loads((run / f"iter_00{i}" / "label" / "_DONE.json").read_text())
    reward = rewards.ModelReward(
        label["reward_model"].replace("${run}", str(run)),
        rc["dtype"],
        rc["max_length"],
        rc["score_batch_size"],
        rc["chat_template"],
    )
    init = read_shards(run / "heldout" / "initial_samples").to_pandas()
    init["reward"] = reward.score(init["prompt"].tolist(), init["response"].tolist())
    new = read_shards(run / f"iter_00{i}" / "evaluate" / "scores").to_pandas()
    both = new.merge(init, on=["prompt_id", "sample_idx"], suffixes=("", "_init"))
    assert len(both) == len(new) == len(init)
    prefs = judged(both["reward"].tolist(), both["reward_init"].tolist())
    return round(sum(prefs) / len(prefs), 4)


@pytest.mark.slow
def test_refresh_learns_judged_pairs_and_labels_with_the_new_model(refresh_run, tiny_rm):
    run = refresh_run
    done = [json.loads((run / f"iter_00{i}" / "reward" / "_DONE.json").read_text()) for i in (0, 1)]
    for d in done:
        assert d["judged_pairs"] + sum(d["dropped"].values()) == 16
    # each judged pair is ordered by the gold judge (it judged them)
    for i in (0, 1):
        for r in pq.read_table(run / f"iter_00{i}" / "reward" / "pairs.parquet").to_pylist():
            assert world.gold_score(r["prompt"], r["chosen"]) > world.gold_score(
                r["prompt"], r["rejected"]
            )
    # iteration 0 refreshes the loaded model; iteration 1 refreshes iteration 0's
    trained = [d for d in done if d["steps"]]
    assert trained, "at least one iteration had pairs to learn"
    assert done[0]["config"]["reward"]["reward_model"] == str(tiny_rm)
    refreshed = done[0]["reward_model"].replace(str(run), "${run}")
    assert done[1]["config"]["reward"]["reward_model"] == refreshed
    for i, d in enumerate(done):
        label = json.loads((run / f"iter_00{i}" / "label" / "_DONE.json").read_text())
        assert label["reward_model"] == d["reward_model"], "labelled by the refreshed model"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    for row, d in zip(rows, done):
        assert row["judged_pairs"] == d["judged_pairs"]
        assert row["rm_agreement_before"] == d["rm_agreement_before"]
        gap = row["proxy_win_rate"] - row["win_rate_vs_initial"]
        assert row["proxy_gold_gap"] == pytest.approx(gap, abs=1e-4)
        assert row["proxy_win_rate"] == round(_proxy_win_rate(run, row["iteration"]), 4)
    assert set(rows[0]["seconds"]) >= {"reward", "label", "evaluate"}


@pytest.mark.slow
def test_refresh_judged_by_a_model_or_by_the_users_file(refresh_run, tiny_rm, tiny_cfg):
    """The same iteration's samples, judged by a judge model, then by a labelled file."""
    run = Path(tiny_cfg.runs_dir) / "judges"
    shutil.copytree(refresh_run / "iter_000" / "generate", run / "iter_000" / "generate")
    (run / "config.yaml").write_text("{}")
    paths = Paths(run=run, base_policy="", reward_model=str(tiny_rm))
    fc = tiny_cfg.reward.refresh
    fc.pairs, fc.judge, fc.judge_path = 16, "model", str(tiny_rm)
    tiny_cfg.generate.n = 8
    tiny_cfg.reward.train = False
    d = refresh.run(tiny_cfg, paths, 0, str(tiny_rm))
    # the judge is the very model that ranked them: it agrees with itself on every pair
    assert d["rm_agreement_before"] == 1.0 and d["judged_pairs"] > 0

    labels = run / "labels"
    labels.mkdir()
    rows = [
        {"prompt": "Greet Anna.", "chosen": "Hello Anna!", "rejected": "Ugh, Hello Rosa!"},
        {"prompt": "What is 1 plus 1?", "chosen": "1 plus 1 is 2.", "rejected": "Whatever."},
        {"prompt": "Count from 1 to 3.", "chosen": "1, 2, 3.", "rejected": "Boring. 1, 3."},
    ]
    (labels / "iter_0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fc.judge, fc.path, fc.judge_path = "file", str(labels / "iter_{iteration}.jsonl"), None
    shutil.rmtree(run / "iter_000" / "reward")
    d = refresh.run(tiny_cfg, paths, 0, str(tiny_rm))
    assert d["judged_pairs"] == 3 and d["steps"] > 0
    got = pq.read_table(run / "iter_000" / "reward" / "pairs.parquet").to_pylist()
    assert [r["chosen"] for r in got] == [r["chosen"] for r in rows]


def test_sweep_summary_over_seeds_mean_and_sd(tmp_path):
    """Jobs that differ only in seed= are merged: mean and sample sd per iteration."""
    wins = {("dpo", 0): [0.6, 0.7, 0.8], ("raft", 0): [0.5, 0.5, 0.8]}
    for (rule, seed_row), values in wins.items():
        for seed, w in enumerate(values):
            job = tmp_path / f"seed={seed},update={rule}"
            job.mkdir()
            row = {
                "iteration": seed_row,
                "update": rule,
                "win_rate_vs_initial": w,
                "gold_mean": w - 1,
                "kl_to_reference": 2.0,
                "accepted": seed != 2,
            }
            (job / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    text = sweep.summarize_sweep(tmp_path)
    seeds = {
        r["job"]: r
        for r in sweep.over_seeds(
            [
                {"job": f"seed={s},update={u}", "iteration": 0, "win_rate_vs_initial": w}
                for (u, _), ws in wins.items()
                for s, w in enumerate(ws)
            ]
        )
    }
    assert seeds["update=dpo"]["win_rate_vs_initial"] == pytest.approx((0.7, 0.1))
    assert seeds["update=raft"]["win_rate_vs_initial"] == pytest.approx((0.6, 0.173205), 1e-5)
    md = (tmp_path / "summary.md").read_text()
    assert "| update=dpo | 0 | 3 | 0.700 ± 0.100 |" in md and "2/3" in md
    assert "mean ± sd over seeds" in text and (tmp_path / "summary_seeds.png").stat().st_size
    # one seed per job: no such table
    assert sweep.over_seeds([{"job": "update=dpo", "iteration": 0}]) == []


def test_refresh_and_ensemble_options_compose():
    cfg = compose_cfg(
        [
            *TINY,
            "reward.ensemble=3",
            "reward.aggregate=min",
            "reward.uncertainty_coef=2",
            "reward.refresh.pairs=32",
            "reward.refresh.judge=model",
            "reward.refresh.judge_path=x/y",
            "reward.refresh.rule=max_random",
            "reward.refresh.replay=0.5",
            "reward.refresh.epochs=3",
            "reward.refresh.lr=1e-4",
            "reward.refresh.path='l/{iteration}.jsonl'",
        ]
    )
    rc = cfg.reward
    assert (rc.ensemble, str(rc.aggregate), rc.uncertainty_coef) == (3, "min", 2.0)
    fc = rc.refresh
    assert (fc.pairs, str(fc.judge), fc.judge_path, str(fc.rule)) == (
        32,
        "model",
        "x/y",
        "max_random",
    )
    assert (fc.replay, fc.epochs, fc.lr, fc.path) == (0.5, 3, 1e-4, "l/{iteration}.jsonl")


def test_a_toy_reward_model_is_trained_once_per_config(tiny_cfg, tiny_world):
    """A second run (another run_name, a sweep's next job) with the same reward config and
    seed reuses the first one's model as a copy; a damaged cache is trained again."""
    tiny_cfg.reward.num_pairs = 120  # a config of this test's own: its cache entry too
    run = lambda name: Paths(  # noqa: E731
        run=Path(tiny_cfg.runs_dir) / name, base_policy=str(tiny_world), toy=tiny_world
    )
    first = reward_model.train(tiny_cfg, run("a"))
    weights = run("a").reward_model_dir / "model" / "model.safetensors"
    second = reward_model.train(tiny_cfg, run("b"))
    again = run("b").reward_model_dir / "model" / "model.safetensors"
    assert second["finished_unix"] == first["finished_unix"] and second["files"] == first["files"]
    assert again.read_bytes() == weights.read_bytes()
    assert again.stat().st_ino != weights.stat().st_ino, "a copy: no bytes shared"
    cached = [
        p
        for p in (Path(tiny_cfg.toy.cache_dir).parent / "reward_models").glob("*")
        if json.loads((p / "_DONE.json").read_text())["finished_unix"] == first["finished_unix"]
    ]
    assert len(cached) == 1
    with open(cached[0] / "model" / "model.safetensors", "r+b") as f:  # damaged in place
        f.write(b"x")
    assert weights.read_bytes() == again.read_bytes(), "the runs' copies are untouched"
    third = reward_model.train(tiny_cfg, run("c"))
    assert third["finished_unix"] != first["finished_unix"], "trained again"
    tiny_cfg.seed = 1  # another seed: another reward model
    assert reward_model.train(tiny_cfg, run("d"))["finished_unix"] != third["finished_unix"]
