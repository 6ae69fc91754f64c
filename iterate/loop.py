"""The order of the stages; the only module that knows it. Finished stages are skipped.

``run(cfg, run_dir)`` makes iterations ``0 .. cfg.iteration-1`` exist, like ``make``:
the toy world (when in use) and the reward model first, then per iteration
prompts -> generate -> label -> pairs -> update -> handoff.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import yaml

from iterate.config import Config, plain
from iterate.paths import Paths

log = logging.getLogger("iterate")


def prepare(cfg: Config, run_dir: Path) -> Paths:
    """Resolve the initial policy (building the toy world if needed) and the run folder."""
    run_dir.mkdir(parents=True, exist_ok=True)
    first = run_dir / "config.yaml"
    if not first.exists():  # the resolved config of the first invocation
        first.write_text(yaml.safe_dump(plain(cfg), sort_keys=False))
    toy = None
    if cfg.model.path is None:
        from iterate.toy import build

        toy = build.ensure(cfg.toy)
    return Paths(run=run_dir, base_policy=cfg.model.path or str(toy), toy=toy)


def reward_model_path(cfg: Config, paths: Paths) -> str:
    """Train the reward model here when asked (the stage before iteration 0)."""
    if cfg.reward.train:
        from iterate import reward_model

        reward_model.train(cfg, paths)
        return str(paths.reward_model_dir / "model")
    if not cfg.reward.path:
        raise ValueError("reward.train is false but reward.path is not set")
    return cfg.reward.path


def run(cfg: Config, run_dir: Path) -> None:
    t0 = time.time()
    paths = prepare(cfg, run_dir)
    rm = reward_model_path(cfg, paths)
    log.info("reward model: %s", rm)
    log.warning(
        "iterations (generate -> label -> pairs -> update -> handoff) are not built yet; "
        "ran what exists: the toy world and the reward model (%.0fs)", time.time() - t0,
    )  # fmt: skip
