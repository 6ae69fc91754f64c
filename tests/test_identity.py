"""A stage's identity is its content: the same under any Python hash seed, in any folder the
run is copied to. The checksum rule for files whose bytes vary without their meaning, then a
run with every optional stage (self-instruct prompts, an ensemble reward model, its refresh)
copied and resumed, and redone stage by stage under another hash seed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from iterate.store.stage import CANONICAL, DONE, Stage, StageConfigChanged, done_id, file_sum

from .conftest import FULL, cli, compose_cfg, hash_seeds


def _adapter_config(path: Path, modules: list[str], base: str, r: int = 16) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    conf = {"base_model_name_or_path": base, "r": r, "target_modules": modules}
    (path / "adapter_config.json").write_text(json.dumps(conf, indent=2))
    return path / "adapter_config.json"


def test_an_adapter_config_is_summed_by_its_meaning(tmp_path):
    assert "adapter_config.json" in CANONICAL
    a = _adapter_config(tmp_path / "a", ["q_proj", "v_proj"], "/one/place")
    b = _adapter_config(tmp_path / "b", ["v_proj", "q_proj"], "/another/place")
    c = _adapter_config(tmp_path / "c", ["q_proj", "v_proj"], "/one/place", r=8)
    assert a.read_bytes() != b.read_bytes()
    assert file_sum(a) == file_sum(b), "set order and where the base was are not content"
    assert file_sum(a) != file_sum(c), "a setting is"
    assert file_sum(a, canonical=False) != file_sum(b, canonical=False)


def test_a_stage_recorded_with_raw_checksums_still_verifies(tmp_path):
    """A stage finished by an earlier version recorded the adapter config's raw checksum;
    it stays valid (no run is broken by the canonical rule)."""
    folder = tmp_path / "update"
    stage = Stage(folder, "update", {"k": 1})
    stage.check()
    conf = _adapter_config(folder / "adapter", ["v_proj", "q_proj"], "/base")
    done = stage.finish()
    done["files"]["adapter/adapter_config.json"]["sha256"] = file_sum(conf, canonical=False)
    (folder / DONE).write_text(json.dumps(done))
    assert Stage(folder, "update", {"k": 1}).check()  # verified: skipped
    conf.write_text(conf.read_text().replace('"r": 16', '"r": 32'))
    with pytest.raises(Exception, match="adapter_config.json"):
        Stage(folder, "update", {"k": 1}).check()


def _done_files(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): p.read_text() for p in run.rglob(DONE)}


def _rerun(run: Path, tiny_cache: Path, seed: str, *more: str):
    return cli(
        [*FULL, f"runs_dir={run.parent}", f"toy.cache_dir={tiny_cache}", *more],
        env={"PYTHONHASHSEED": seed},
    )


@pytest.mark.slow
def test_a_copied_run_with_every_optional_stage_resumes(full_run, tiny_cache, tmp_path):
    """... under another hash seed, and with the names shown in the cards changed: a name
    is not a setting that decides a stage's output."""
    run = tmp_path / "elsewhere" / "toy_tiny"
    shutil.copytree(full_run, run)
    refreshed = json.loads((run / "iter_001" / "reward" / DONE).read_text())
    assert refreshed["steps"] and refreshed["reward_model"] == "${run}/iter_001/reward/model"
    records = [*run.rglob(DONE), *run.rglob("_CONFIG.json"), run / "_FINISHED.json"]
    where = [p for p in records if str(full_run) in p.read_text()]
    assert not where, f"a path of where the run was: {where}"
    before = _done_files(run)
    out = _rerun(run, tiny_cache, hash_seeds()[1], "model.name=renamed", "reward.name=renamed")
    assert out.returncode == 0, out.stderr[-3000:]
    assert _done_files(run) == before, "nothing redone"
    assert "renamed" in (run / "iter_001" / "handoff" / "policy" / "README.md").read_text()


def test_a_stage_recorded_with_a_setting_that_no_longer_counts_stands(tmp_path):
    """Earlier versions hashed the display-only ``model.name`` (``stage.RETIRED``): such a
    stage is not refused, while a setting that counts still is."""
    folder = tmp_path / "generate"
    old = {"model": {"name": "shown", "path": "p"}, "seed": 0}
    stage = Stage(folder, "generate", old)
    stage.check()
    stage.finish()
    assert Stage(folder, "generate", {"model": {"path": "p"}, "seed": 0}).check()
    with pytest.raises(StageConfigChanged, match="model.path"):
        Stage(folder, "generate", {"model": {"path": "q"}, "seed": 0}).check()


def test_every_setting_a_stage_hashes_is_classified():
    """Each section a stage hashes lists every setting once: counted (it decides what the
    stage writes) or not (a name, how the work is spread). A new setting fails here until
    it is classified, so it can never silently leave a stale stage standing."""
    import dataclasses

    from iterate import config
    from iterate.store import stage

    classes = {
        "model": config.ModelConfig,
        "generate": config.GenerateConfig,
        "reward": config.RewardConfig,
        "reward.refresh": config.RefreshConfig,
        "prompts": config.PromptsConfig,
        "pairs": config.PairsConfig,
        "handoff": config.HandoffConfig,
    }
    assert set(classes) == set(stage.COUNTED) == set(stage.NOT_COUNTED)
    for section, cls in classes.items():
        yes, no = stage.COUNTED[section], stage.NOT_COUNTED[section]
        assert not set(yes) & set(no), section
        assert sorted([*yes, *no]) == sorted(f.name for f in dataclasses.fields(cls)), section
    assert "name" in stage.NOT_COUNTED["model"] and "path" in stage.COUNTED["model"]


@pytest.mark.slow
def test_a_stage_redone_under_another_hash_seed_keeps_its_identity(full_run, tiny_cache, tmp_path):
    """Each kind of stage that writes a model (the reward model, its refresh, the update,
    the handoff) redone under a hash seed that orders peft's target modules otherwise: the
    same identities, so nothing after them is refused or redone."""
    run = tmp_path / "toy_tiny"
    shutil.copytree(full_run, run)
    redo = ["reward_model", "iter_000/reward", "iter_000/update", "iter_000/handoff"]
    ids = {rel: done_id(run / rel) for rel in redo}
    adapter = "iter_000/update/adapter/adapter_config.json"
    before = (run / adapter).read_bytes()
    for rel in redo:
        shutil.rmtree(run / rel)
    kept = _done_files(run)
    out = _rerun(run, tiny_cache, hash_seeds()[1])
    assert out.returncode == 0, out.stderr[-3000:]
    assert (run / adapter).read_bytes() != before, "the hash seed changed the file's bytes"
    assert {rel: done_id(run / rel) for rel in redo} == ids
    after = _done_files(run)
    assert {k: after[k] for k in kept} == kept, "the stages after them stand"


def test_a_damaged_record_is_bad_input_naming_the_file(tmp_path):
    """A ``_DONE.json`` cut short (a full disk, a hand edit) or a damaged metrics line is
    named, with what to do; never a traceback from the JSON parser."""
    from iterate.errors import BadInput
    from iterate.store.shards import read_jsonl

    folder = tmp_path / "label"
    stage = Stage(folder, "label", {"k": 1})
    stage.check()
    stage.finish()
    done = folder / DONE
    done.write_text(done.read_text()[:40])
    with pytest.raises(BadInput, match=f"{done}.* is damaged .*delete it"):
        Stage(folder, "label", {"k": 1}).check()
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"iteration": 0}\n{"iteration": 1, "kl"\n')
    with pytest.raises(BadInput, match="metrics.jsonl: line 2 is damaged"):
        read_jsonl(metrics)


def test_an_outside_reward_models_weights_are_part_of_what_scored(tmp_path):
    """A reward model from outside the run is hashed by its files, not its name: new
    weights under the same folder name are a changed input of the stages that scored with
    it (refused, naming the key); a stage recorded before the weights were hashed resumes."""
    from iterate.rewards import ModelReward

    rm = tmp_path / "rm"
    rm.mkdir()
    (rm / "config.json").write_text("{}")
    (rm / "model.safetensors").write_bytes(b"weights" * 100)
    now = ModelReward(str(rm)).identity()
    assert "reward_weights" in now
    earlier = {k: v for k, v in now.items() if k != "reward_weights"}
    Stage(tmp_path / "label", "label", earlier).finish()  # recorded by an earlier version
    assert Stage(tmp_path / "label", "label", now).check() is True
    shutil.rmtree(tmp_path / "label")
    Stage(tmp_path / "label", "label", now).finish()
    (rm / "model.safetensors").write_bytes(b"other weights" * 100)
    changed = ModelReward(str(rm)).identity()
    assert changed["reward_weights"] != now["reward_weights"]
    with pytest.raises(StageConfigChanged, match="reward_weights"):
        Stage(tmp_path / "label", "label", changed).check()


def test_a_setting_added_later_resumes_old_stages_only_at_its_old_value(tmp_path):
    """A held-out set drawn before ``prompts.heldout_path`` existed resumes while the setting
    is unset (what was done then); set to a file, it is a change, refused naming the key."""
    from iterate.stages import prompts

    cfg = compose_cfg(["prompts.heldout=8"], tmp_path)
    now = prompts.heldout_config(cfg)
    assert now["prompts"]["heldout_path"] is None
    earlier = {
        **now,
        "prompts": {
            k: v for k, v in now["prompts"].items() if k not in ("heldout_path", "heldout_field")
        },
    }
    Stage(tmp_path / "heldout", "heldout", earlier).finish()
    assert Stage(tmp_path / "heldout", "heldout", now).check() is True
    cfg.prompts.heldout_path = str(tmp_path / "alpaca_eval.json")
    with pytest.raises(StageConfigChanged, match="prompts.heldout_path"):
        Stage(tmp_path / "heldout", "heldout", prompts.heldout_config(cfg)).check()


def test_an_evaluation_judge_is_hashed_by_its_source(tmp_path):
    """Editing the function behind ``evaluate.judges`` redoes the evaluations it made, as
    editing a reward function redoes the stages that scored with it: the evaluate stage is
    refused naming the judge's source checksum. An evaluation recorded before the judges'
    sources were hashed resumes."""
    from iterate import rewards
    from iterate.stages import evaluate
    from iterate.store.paths import Paths

    judge = tmp_path / "judge.py"
    judge.write_text("def chars(prompts, responses):\n    return [len(r) for r in responses]\n")
    spec = f"{{kind: function, function: '{judge}:chars', name: chars}}"
    cfg = compose_cfg(["reward=gold", f"evaluate.judges=[{spec}]"], tmp_path)
    paths = Paths(run=tmp_path / "run", base_policy="base")
    reward = rewards.of(cfg, run=paths.run)
    stage = lambda: evaluate.stage_for(cfg, paths, 0, "base", "base", reward)  # noqa: E731
    now = stage()
    assert set(now.config["judge_identity"]) == {"gold", "correct", "chars"}
    earlier = {k: v for k, v in now.config.items() if k not in ("judge_identity", "inputs")}
    inputs = [paths.stage(0, "update"), *evaluate.constrained(cfg, paths, 0), paths.heldout_dir]
    Stage(now.path, "evaluate", earlier, inputs).finish()  # recorded by an earlier version
    assert stage().check() is True
    shutil.rmtree(now.path)
    stage().finish()
    assert stage().check() is True
    judge.write_text("def chars(prompts, responses):\n    return [-len(r) for r in responses]\n")
    with pytest.raises(StageConfigChanged, match=r"judge_identity\.chars\.source_tree_sha256"):
        stage().check()


def test_a_reward_functions_identity_is_not_the_path_as_typed(tmp_path, monkeypatch):
    """A reward function in a file is the same function however its path is typed
    (``rel/rf.py:f``, ``./rel/rf.py:f``, absolute): its identity is the file's name, the
    function and the source's checksum, for the reward, an evaluation judge and the
    reward model's labeller; editing the source still changes it."""
    from iterate import rewards
    from iterate.stages import evaluate, reward_model
    from iterate.store.paths import Paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "rel").mkdir()
    source = tmp_path / "rel" / "rf.py"
    source.write_text("def f(prompts, responses):\n    return [len(r) for r in responses]\n")
    typed = ["rel/rf.py:f", "./rel/rf.py:f", f"{source}:f", "rel/../rel/rf.py:f"]
    ids = [rewards.FunctionReward(t).identity() for t in typed]
    assert all(i == ids[0] for i in ids) and ids[0]["reward_function"] == "rf.py:f"
    paths = Paths(run=tmp_path / "run", base_policy="base")

    def confs(spec: str) -> tuple[dict, dict]:
        judge = f"{{kind: function, function: '{spec}', name: chars}}"
        cfg = compose_cfg(
            [
                f"reward.function={spec}",
                "reward.kind=function",
                f"evaluate.judges=[{judge}]",
                "reward.source=policy",
                f"reward.label_function={spec}",
            ],
            tmp_path,
        )
        reward = rewards.of(cfg, run=paths.run)
        stage = evaluate.stage_for(cfg, paths, 0, "base", "base", reward)
        return stage.config, reward_model.labeller(cfg, paths).identity()

    firsts = confs(typed[0])
    assert all(confs(t) == firsts for t in typed[1:])
    Stage(tmp_path / "evaluate", "evaluate", firsts[0]).finish()
    assert Stage(tmp_path / "evaluate", "evaluate", confs(typed[2])[0]).check() is True
    source.write_text("def f(prompts, responses):\n    return [-len(r) for r in responses]\n")
    edited = confs(typed[1])
    assert edited[1]["source_tree_sha256"] != firsts[1]["source_tree_sha256"]
    with pytest.raises(StageConfigChanged, match=r"reward\.source_tree_sha256"):
        Stage(tmp_path / "evaluate", "evaluate", edited[0]).check()
