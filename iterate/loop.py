"""The order of the stages; the only module that knows it. Finished stages are skipped.

``run(cfg, run_dir)`` makes iterations ``0 .. cfg.iteration-1`` exist, like ``make``:
the toy world (when in use) and the reward model first, then per iteration
prompts -> generate -> label -> pairs -> update -> handoff. Every stage is a function of
the config and the run folder; they talk through files only.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import yaml

from iterate.config import Config, plain
from iterate.paths import Paths
from iterate.shards import atomic_write_json

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


def _done(path: Path) -> dict | None:
    p = path / "_DONE.json"
    return json.loads(p.read_text()) if p.exists() else None


def _comparable(cfg: Config) -> dict:
    d = plain(cfg)
    for k in ("iteration", "force"):
        d.pop(k, None)
    return d


def is_finished(cfg: Config, paths: Paths) -> bool:
    """True when a run with this very config already made the asked-for iterations (or
    stopped on a rejection): ``_FINISHED.json`` is written at the end of every full run."""
    marker = paths.run / "_FINISHED.json"
    if not marker.exists():
        return False
    fin = json.loads(marker.read_text())
    return fin["config"] == _comparable(cfg) and (fin["iterations"] >= cfg.iteration or fin["stopped"])


def next_policy(cfg: Config, paths: Paths, i: int, policy: str, handoff: dict) -> str:
    if handoff["kl"]["accepted"]:
        return str(paths.stage(i, "handoff") / "policy")
    return policy  # keep_previous: the next iteration starts again from this one's policy


def run(cfg: Config, run_dir: Path) -> list[dict]:
    """Make iterations 0..cfg.iteration-1 exist; return the metrics rows."""
    from iterate import report

    paths = Paths(run=run_dir, base_policy=cfg.model.path or "")
    if is_finished(cfg, paths):
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        log.info("nothing to do: %s already has iterations 0..%d\n%s", run_dir, cfg.iteration - 1, report.table(rows))
        return rows
    t0 = time.time()
    paths = prepare(cfg, run_dir)
    rm = reward_model_path(cfg, paths)
    paths.reward_model = rm
    from iterate import generate

    try:
        rows = iterate(cfg, paths, rm)
    finally:
        generate.close_engine()  # a kept vLLM engine lives for one run
    report.write_metrics(run_dir / "metrics.jsonl", rows)
    report.plot(rows, run_dir / "metrics.png", max_kl=cfg.handoff.max_kl)
    stopped = len(rows) < cfg.iteration
    atomic_write_json(run_dir / "_FINISHED.json", {"config": _comparable(cfg), "iterations": len(rows), "stopped": stopped})
    accepted = [r["iteration"] for r in rows if r["accepted"]]
    final = paths.stage(accepted[-1], "handoff") / "policy" if accepted else paths.base_policy
    log.info("%s: %d iterations in %.0fs\n%s\nmetrics: %s, plot: %s\nfinal policy: %s", run_dir, len(rows),
             time.time() - t0, report.table(rows), run_dir / "metrics.jsonl", run_dir / "metrics.png", final)  # fmt: skip
    return rows


SUMMARY_KEYS = ("rows_in", "rows_out", "dropped", "eos_rate", "reward_mean", "gold_mean", "steps", "skipped_steps",
                "win_rate_vs_initial")  # fmt: skip


def _log(i: int, done: dict) -> dict:
    """The one-line summary of a stage, from its ``_DONE.json``."""
    parts = [f"{k}={done[k]}" for k in SUMMARY_KEYS if done.get(k) not in (None, {}, [])]
    log.info("iter %d %-8s %5.1fs  %s", i, done["stage"], done["seconds"], "  ".join(parts))
    return done


def iterate(cfg: Config, paths: Paths, rm: str) -> list[dict]:
    from iterate import generate, handoff, label, pairs, prompts, report
    from iterate.update import RULES

    heldout = prompts.heldout(cfg, paths)
    policy = reference = paths.base_policy
    rows: list[dict] = []
    for i in range(cfg.iteration):
        t = time.time()
        batch = prompts.run(cfg, paths, i)
        done = {"prompts": _done(paths.stage(i, "prompts"))}
        done["generate"] = _log(i, generate.run(cfg, paths, i, policy, batch))
        done["label"] = _log(i, label.run(cfg, paths, i, rm))
        done["pairs"] = _log(i, pairs.run(cfg, paths, i))
        done["update"] = _log(i, RULES[str(cfg.update.name)](cfg, paths, i, policy, reference))
        done["handoff"] = _log(i, handoff.run(cfg, paths, i, policy, reference, rm, heldout, rows))
        rows.append(report.metrics_row(cfg, i, done))
        report.write_metrics(paths.run / "metrics.jsonl", rows)
        log.info(
            "iteration %d: %d pairs, reward %.3f, KL %.4f, %s (%.0fs)", i, done["pairs"]["rows_out"],
            done["label"]["reward_mean"], done["handoff"]["kl"]["k1"], done["handoff"]["kl"]["decision"], time.time() - t,
        )  # fmt: skip
        if not done["handoff"]["kl"]["accepted"] and cfg.handoff.on_reject == "stop":
            log.warning("iteration %d: policy rejected by the KL gate (on_reject=stop): the loop stops here", i)
            break
        new = next_policy(cfg, paths, i, policy, done["handoff"])
        reference = new if cfg.handoff.reference == "previous" else paths.base_policy
        policy = new
    return rows
