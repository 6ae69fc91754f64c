"""The order of the stages; the only module that knows it. Finished stages are skipped.

``run(cfg, run_dir)`` makes iterations ``0 .. cfg.iteration-1`` exist, like ``make``:
the toy world (when in use), the reward model, the held-out prompts and the initial
policy's samples of them first, then per iteration
prompts -> [generate -> (reward) -> label -> pairs] -> update -> evaluate -> handoff, where
the bracketed stages run only for the rules that read best-of-n pairs (DPO, RAFT; PPO and
ReMax roll out inside their update), and the reward model's refresh only when asked.
Every stage is a function of the config and the run folder; they talk through files only.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from pathlib import Path

import yaml

from iterate import errors, rewards, workers
from iterate.config import Config, plain
from iterate.stages.plan import between_stages, run_stages
from iterate.store.paths import CARD, Paths
from iterate.store.shards import atomic_write_json, read_json, read_jsonl
from iterate.store.stage import DONE, Stage
from iterate.train.rules import rule

log = logging.getLogger("iterate")


def prepare(cfg: Config, run_dir: Path) -> Paths:
    """Resolve the initial policy (building the toy world if needed) and the run folder."""
    run_dir.mkdir(parents=True, exist_ok=True)
    first = Paths(run=run_dir, base_policy="").config
    if not first.exists():  # the resolved config of the first invocation
        first.write_text(yaml.safe_dump(plain(cfg), sort_keys=False))
    toy = None
    if cfg.model.path is None:
        from iterate.toy import build

        toy = build.ensure(cfg.toy)
    return Paths(run=run_dir, base_policy=cfg.model.path or str(toy), toy=toy)


def reward_model_path(cfg: Config, paths: Paths) -> str:
    """Train the reward model here when asked (the stage before iteration 0); a reward
    function has none ("")."""
    if not rewards.has_model(cfg):
        return ""
    if rewards.trains_model(cfg):
        from iterate.stages import reward_model

        reward_model.train(cfg, paths)
        return str(paths.trained_reward_model)
    if not cfg.reward.path:
        raise errors.BadInput("reward.train is false but reward.path is not set")
    return cfg.reward.path


def _done(path: Path) -> dict | None:
    return read_json(path / DONE)


def _comparable(cfg: Config) -> dict:
    d = plain(cfg)
    for k in ("iteration", "force", "threads"):  # (how it runs, not what it makes)
        d.pop(k, None)
    return d


def expected_stages(cfg: Config, paths: Paths, iterations: int) -> list[Path]:
    """Every stage folder a run of this config has once it made ``iterations`` iterations:
    from the config and the tables (``plan.run_stages``), not from what exists."""
    before, each = run_stages(cfg)
    if cfg.iteration == 0:  # a reward-model recipe
        before = tuple(s for s in before if s == "reward_model")
    out = [paths.before(name) for name in before]
    return out + [paths.stage(i, name) for i in range(iterations) for name in each]


def is_finished(cfg: Config, paths: Paths) -> bool:
    """True when a run with this very config already made the asked-for iterations (or
    stopped on a rejection): ``_FINISHED.json`` is written at the end of every full run; and
    every stage such a run has is there with its files of the recorded sizes, and so are
    what the end of a run writes (``metrics.jsonl``, its plot, the model cards), else the
    loop goes through the stages again (skipping what is done) and rewrites them."""
    fin = read_json(paths.finished)
    if fin is None:
        return False
    if fin["config"] != _comparable(cfg) or not (
        fin["iterations"] >= cfg.iteration or fin["stopped"]
    ):
        return False
    for folder in expected_stages(cfg, paths, fin["iterations"]):
        if not (folder / DONE).exists():
            log.warning("%s: its stage is not done (deleted?): it runs again", folder)
            return False
        Stage(folder, folder.name, {}).verify(checksums=False)
    n = fin["iterations"]
    made = [paths.metrics, paths.plot] if n else []
    made += [paths.handoff_policy(i) / CARD for i in range(n)]
    rows = read_jsonl(paths.metrics)
    if not all(p.exists() for p in made) or len(rows) != n:
        log.warning("%s: metrics, plot or model cards missing: written again", paths.run)
        return False
    return True


def next_policy(cfg: Config, paths: Paths, i: int, policy: str, handoff: dict) -> str:
    if handoff["kl"]["accepted"]:
        return str(paths.handoff_policy(i))
    return policy  # keep_previous: the next iteration starts again from this one's policy


def run(cfg: Config, run_dir: Path) -> list[dict]:
    """Make iterations 0..cfg.iteration-1 exist; return the metrics rows."""
    from iterate.run import validate
    from iterate.store.runlock import RunLock

    validate.check(cfg)  # every setting, before any work
    with RunLock(run_dir), workers.torch_threads(cfg.threads):  # one writer per run folder
        stopped = Paths(run=run_dir, base_policy="").stopped
        stopped.unlink(missing_ok=True)  # this run's stop, if any, is what it will say
        try:
            return _run(cfg, run_dir)
        except (Exception, KeyboardInterrupt) as e:
            _record_stop(stopped, e)
            raise


def _record_stop(path: Path, e: BaseException) -> None:
    """``_STOPPED.json``: what stopped the run, for the inspector (a record that cannot be
    written, a full disk say, is left out: the error that stopped the run is reported)."""
    status = errors.status_of(e)
    try:
        atomic_write_json(
            path,
            {
                "status": status,
                "says": errors.WORDS[status],
                "error": f"{e}"[:2000],
                "type": type(e).__name__,
                "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
        )
    except OSError as failed:
        log.warning("%s: not written (%s)", path, failed)


def _run(cfg: Config, run_dir: Path) -> list[dict]:
    from iterate.report import metrics

    paths = Paths(run=run_dir, base_policy=cfg.model.path or "")
    if is_finished(cfg, paths):
        rows = read_jsonl(paths.metrics)
        last = f"iterations 0..{cfg.iteration - 1}" if cfg.iteration else "its reward model"
        log.info("nothing to do: %s already has %s\n%s", run_dir, last, metrics.table(rows))
        return rows
    t0 = time.time()
    if cfg.iteration:
        from iterate.stages import prompts

        prompts.check_pool(cfg, paths)  # before anything is built or trained
    paths = prepare(cfg, run_dir)
    rm = reward_model_path(cfg, paths)
    paths.reward_model = rm
    if cfg.iteration == 0:  # a reward-model recipe: the stage before iteration 0 only
        _finish(cfg, paths, [])
        log.info("%s: reward model only (iteration=0), %.0fs: %s", run_dir, time.time() - t0, rm)
        return []
    from iterate.sampling import samplers

    try:
        rows = iterate(cfg, paths, rm)
    finally:
        samplers.close_kept()  # a kept vLLM engine lives for one run
    metrics.write_metrics(paths.metrics, rows)
    metrics.plot(rows, paths.plot, max_kl=cfg.handoff.max_kl)
    _finish(cfg, paths, rows)
    accepted = [r["iteration"] for r in rows if r["accepted"]]
    final = paths.handoff_policy(accepted[-1]) if accepted else paths.base_policy
    log.info(
        "%s: %d iterations in %.0fs\n%s\nmetrics: %s, plot: %s\nfinal policy: %s (with its "
        "model card)\ninspect: python -m iterate show %s samples=3",
        run_dir,
        len(rows),
        time.time() - t0,
        metrics.table(rows),
        paths.metrics,
        paths.plot,
        final,
        run_dir,
    )
    return rows


def _finish(cfg: Config, paths: Paths, rows: list[dict]) -> None:
    """``_FINISHED.json``: this config made the asked-for iterations (or stopped early)."""
    fin = {
        "config": _comparable(cfg),
        "iterations": len(rows),
        "stopped": len(rows) < cfg.iteration,
        "stages": [str(p.relative_to(paths.run)) for p in expected_stages(cfg, paths, len(rows))],
    }
    atomic_write_json(paths.finished, fin)


SUMMARY_KEYS = (
    "judged_pairs",
    "rm_agreement_before",
    "judged_heldout_accuracy_after",
    "rows_in",
    "rows_out",
    "responses",
    "dropped",
    "eos_rate",
    "reward_mean",
    "heldout_reward_mean",
    "gold_mean",
    "win_rate_vs_initial",
    "steps",
    "skipped_steps",
    "empty_steps",
    "alpha",
    "decision",
)


def _log(i: int, done: dict) -> dict:
    """The one-line summary of a stage, from its ``_DONE.json``."""
    parts = [f"{k}={done[k]}" for k in SUMMARY_KEYS if done.get(k) not in (None, {}, [])]
    if "kl" in done:
        parts.append(f"kl_k1={done['kl']['k1']}")
    log.info("iter %d %-8s %5.1fs  %s", i, done["stage"], done["seconds"], "  ".join(parts))
    return done


def before_update(
    name: str, cfg: Config, paths: Paths, i: int, policy: str, batch, rm: str
) -> dict:
    """A stage that a rule reads before its update (the pair rules': best-of-n samples, their
    labels, the pairs)."""
    from iterate.stages import generate, label, pairs

    if name == "generate":
        return generate.run(cfg, paths, i, policy, batch)
    if name == "label":
        return label.run(cfg, paths, i, rm)
    return pairs.run(cfg, paths, i)


def iterate(cfg: Config, paths: Paths, rm: str) -> list[dict]:
    from iterate import track
    from iterate.report import cards, metrics
    from iterate.stages import constrain, evaluate, handoff, heldout, prompts
    from iterate.stages import reward as refresh

    heldout.prompts(cfg, paths)  # the held-out set and the initial policy's samples of it
    heldout.check_reference(cfg, paths)
    heldout.initial_samples(cfg, paths)
    update = rule(cfg.update.name)
    policy = reference = paths.base_policy
    rows: list[dict] = []
    for i in range(cfg.iteration):
        t = time.time()
        batch = prompts.run(cfg, paths, i, policy)
        done = {"prompts": _done(paths.stage(i, "prompts"))}
        for name in between_stages(cfg):  # what the rule reads besides the prompts
            if name == "reward":  # the reward model learns the policy's samples
                done["reward"] = _log(i, refresh.run(cfg, paths, i, rm))
                rm = done["reward"]["reward_model"]  # (paths.reward_model: the run's own)
            else:
                done[name] = _log(i, before_update(name, cfg, paths, i, policy, batch, rm))
        done["update"] = _log(i, update.run(cfg, paths, i, policy, reference))
        if cfg.handoff.constrain:  # the policy within the KL target the evaluation sees
            done["constrain"] = _log(i, constrain.run(cfg, paths, i, policy, reference, rm))
        done["evaluate"] = _log(i, evaluate.run(cfg, paths, i, policy, reference, rm))
        done["handoff"] = _log(i, handoff.run(cfg, paths, i, policy, done["evaluate"]))
        rows.append(metrics.metrics_row(cfg, i, done))
        metrics.write_metrics(paths.metrics, rows)
        cards.write_cards(cfg, paths, rows)  # the row is complete: the cards can say it all
        with track.Tracker(cfg, paths.run) as tracker:
            tracker.iteration(paths, rows[-1], partial(_extremes, paths.run, i))
        row = rows[-1]
        log.info(
            "iteration %d: %s responses, reward %s, KL %.4f, %s (%.0fs)",
            i,
            row["responses"],
            row["reward_mean"],
            row["kl_to_reference"],
            done["handoff"]["kl"]["decision"],
            time.time() - t,
        )
        if not done["handoff"]["kl"]["accepted"] and cfg.handoff.on_reject == "stop":
            log.warning("iteration %d: rejected by the handoff (on_reject=stop): the loop stops", i)
            break
        new = next_policy(cfg, paths, i, policy, done["handoff"])
        reference = new if cfg.handoff.reference == "previous" else paths.base_policy
        policy = new
    return rows


def _extremes(run: Path, i: int, k: int):
    """Iteration i's k best and k worst held-out responses, as the trackers' samples table."""
    from iterate.report import runinfo

    return runinfo.extremes(runinfo.scored(run, i, True, keep=k), k)
