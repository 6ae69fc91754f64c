"""Cache keys name the code that makes an artefact, not only its config."""

from __future__ import annotations

import shutil

from iterate.store import cachekey


def test_sources_follow_imports_into_functions_and_packages():
    names = {
        str(p.relative_to(cachekey.PACKAGE))
        for p in cachekey.sources("iterate.stages.reward_model")
    }
    # imported directly (scoring), from a package (toy/world.py: `from iterate.toy import world`)
    assert {
        "stages/reward_model.py",
        "rewards/scorer.py",
        "train/losses.py",
        "toy/world.py",
    } <= names
    assert "run/loop.py" not in names, "only what it imports"
    toy = {str(p.relative_to(cachekey.PACKAGE)) for p in cachekey.sources("iterate.toy.build")}
    assert {"toy/build.py", "toy/world.py", "train/models.py"} <= toy


def test_a_key_changes_with_the_code_that_makes_the_artefact(tmp_path, monkeypatch):
    copy = tmp_path / "iterate"
    shutil.copytree(cachekey.PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(cachekey, "PACKAGE", copy)
    before = cachekey.key({"seed": 0}, "iterate.stages.reward_model")
    assert before == cachekey.key({"seed": 0}, "iterate.stages.reward_model")
    assert before != cachekey.key({"seed": 1}, "iterate.stages.reward_model")
    with open(copy / "run" / "loop.py", "a") as f:  # not imported by it: the same key
        f.write("\n# edited\n")
    assert cachekey.key({"seed": 0}, "iterate.stages.reward_model") == before
    with open(copy / "train" / "losses.py", "a") as f:  # imported by it: another key
        f.write("\n# edited\n")
    assert cachekey.key({"seed": 0}, "iterate.stages.reward_model") != before
