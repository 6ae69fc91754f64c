"""The run inspector's view of a run's stages is the loop's: for every reward kind, trained
in the run or loaded, refreshed or not, ``iterate show`` lists the stages the loop runs."""

from __future__ import annotations

import pytest
import yaml

from iterate.config import plain
from iterate.report import runinfo
from iterate.run import loop
from iterate.store.paths import Paths

from .conftest import compose_cfg

KINDS = {
    "model": ["reward=toy"],
    "model loaded": ["reward=toy", "reward.train=false", "reward.path=/models/rm"],
    "function": ["reward=gold"],
    "mixture": ["reward=toy_length"],
    "pairwise": ["reward=toy_pairwise"],
    "judge": ["reward=toy_judge"],
}


@pytest.mark.parametrize("refresh", [0, 16], ids=["no refresh", "refresh"])
@pytest.mark.parametrize("update", ["dpo", "grpo"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_the_inspector_lists_the_stages_the_loop_runs(tmp_path, kind, update, refresh):
    cfg = compose_cfg(
        [*KINDS[kind], f"update={update}", f"reward.refresh.pairs={refresh}", "iteration=2"],
        tmp_path,
    )
    run = tmp_path / "run"
    paths = Paths(run=run, base_policy="base")
    run.mkdir()
    paths.config.write_text(yaml.safe_dump(plain(cfg), sort_keys=False))
    for i in range(2):
        paths.iteration(i).mkdir()  # started, nothing done: every stage it will have shows
    shown = runinfo.states(run)
    listed = [paths.before(s.name) for s in shown.pop("before")]
    listed += [paths.stage(i, s.name) for i in range(2) for s in shown[f"iter {i}"]]
    assert listed == loop.expected_stages(cfg, paths, 2)
    names = {p.name for p in listed}
    assert ("reward_model" in names) == (kind not in ("function", "model loaded"))
    refreshed = refresh and kind in ("model", "model loaded", "mixture") and update == "dpo"
    assert ("reward" in names) == bool(refreshed)


def test_a_config_this_version_cannot_read_lists_what_the_folders_have(tmp_path):
    run = tmp_path / "run"
    paths = Paths(run=run, base_policy="base")
    (run / "heldout").mkdir(parents=True)
    paths.config.write_text(yaml.safe_dump({"reward": {"kind": "retired"}, "update": {}}))
    (paths.stage(0, "prompts")).mkdir(parents=True)
    shown = runinfo.states(run)
    assert [s.name for s in shown["before"]] == ["heldout"]
    assert [s.name for s in shown["iter 0"]] == ["prompts"]
