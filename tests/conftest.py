"""Shared fixtures: Hydra composition and a tiny toy world built once per test session."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from iterate.config import Config, register, to_dataclass

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

register()

# A test that builds or loads a model (the tiny world, the recipes' miniatures), trains, or
# starts an engine is `slow`; the fast tier (make test-fast) runs the others. A test that
# asks for one of these fixtures, directly or through another, is marked here; tests that
# make their models themselves carry the mark in their module.
MODEL_FIXTURES = {"tiny_world", "minis"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


# trackers stay on this machine: W&B offline (files under the run), trackio in a temporary
# folder (it reads TRACKIO_DIR once, when first imported)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TRACKIO_DIR", tempfile.mkdtemp(prefix="iterate-tests-trackio-"))

# The tiny world: seconds to build, still a real tokenizer, Llama and SFT.
TINY = [
    "experiment=toy_tiny",
]


def cli(
    args: list[str], env: dict | None = None, timeout: int = 900
) -> subprocess.CompletedProcess:
    """``python -m iterate ARGS`` from the project root, in a process group of its own (the
    crash tests kill it whole)."""
    return subprocess.run(
        [sys.executable, "-m", "iterate", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )


def tensorboard_events(folder: Path) -> list[tuple[str, int, object]]:
    """Every (tag, step, value) in a TensorBoard log folder as written, across its event
    files (one a tracker session): scalars as floats, text as str."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    files = []  # in the order they were written: a file's first event's time (its name's
    for path in Path(folder).glob("events.out.tfevents.*"):  # counter is per process)
        events = list(EventFileLoader(str(path)).Load())
        files.append((events[0].wall_time if events else 0.0, events))
    out = []
    for _, events in sorted(files, key=lambda f: f[0]):
        for event in events:
            for v in event.summary.value:
                t = v.tensor
                value = t.string_val[0].decode() if t.string_val else float(t.float_val[0])
                out.append((v.tag, event.step, value))
    return out


def compose_cfg(overrides: list[str] = (), tmp: Path | None = None) -> Config:
    """Compose conf/config.yaml with overrides, exactly as `python -m iterate` does."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        extra = [f"toy.cache_dir={tmp / 'toy'}", f"runs_dir={tmp / 'runs'}"] if tmp else []
        return to_dataclass(compose("config", overrides=[*overrides, *extra]))


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("toy")


@pytest.fixture(scope="session")
def tiny_world(tiny_cache) -> Path:
    from iterate.toy import build

    cfg = compose_cfg(TINY)
    cfg.toy.cache_dir = str(tiny_cache)
    return build.ensure(cfg.toy)


@pytest.fixture
def tiny_cfg(tmp_path, tiny_cache, tiny_world) -> Config:
    cfg = compose_cfg(TINY)
    cfg.toy.cache_dir = str(tiny_cache)
    cfg.runs_dir = str(tmp_path / "runs")
    return cfg


@pytest.fixture(scope="session")
def tiny_rm(tiny_cache, tiny_world, tmp_path_factory) -> Path:
    """A tiny reward model trained once for every loop test."""
    from iterate.stages import reward_model
    from iterate.store.paths import Paths

    cfg = compose_cfg(TINY)
    cfg.toy.cache_dir = str(tiny_cache)
    run = tmp_path_factory.mktemp("rm_run")
    reward_model.train(cfg, Paths(run=run, base_policy=str(tiny_world), toy=tiny_world))
    return run / "reward_model" / "model"


def hash_seeds(names=("q_proj", "v_proj")) -> tuple[str, str]:
    """Two values of PYTHONHASHSEED under which a set of these names (peft's LoRA target
    modules for Llama) iterates in different orders."""
    code = f"print(list(set({list(names)!r})))"
    seen: dict[str, str] = {}
    for seed in map(str, range(32)):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        order = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        ).stdout
        if seen and order not in seen.values():
            return next(iter(seen)), seed
        seen[seed] = order
    raise AssertionError("no two hash seeds order the set differently")


FULL = [  # every optional stage on: self-instruct prompts, an ensemble reward model trained
    *TINY,  # here and refreshed on each iteration's samples, in a mixture with a length term
    "reward=toy_length",
    "reward.sources.1.weight=0.02",  # (this weight: iteration 1's refresh has pairs to learn)
    "prompts=self_instruct",
    "iteration=2",
    "reward.num_pairs=100",
    "reward.ensemble=2",
    "reward.cache=false",  # trained in the run: its redo is a real redo
    "generate.n=8",
    # every prompt of the iteration judged: the tiny policy's samples mostly tie under the
    # gold judge, and a refresh needs two judged pairs to train
    "prompts.per_iteration=32",
    "reward.refresh.pairs=32",
]


@pytest.fixture(scope="session")
def full_run(tiny_cache, tiny_world, tmp_path_factory) -> Path:
    """A two-iteration run of the tiny world with every optional stage, made by the command
    line under the first of ``hash_seeds()``."""
    runs = tmp_path_factory.mktemp("full")
    out = cli(
        [*FULL, f"runs_dir={runs}", f"toy.cache_dir={tiny_cache}"],
        env={"PYTHONHASHSEED": hash_seeds()[0]},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return runs / "toy_tiny"
