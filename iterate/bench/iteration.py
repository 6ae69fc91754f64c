"""The wall time of a toy iteration per stage, and its fixed overheads (engine start or
weight load, model loads, saves, merge) as a share, read from the stages' ``_DONE.json``.

Unlike the other sections, the two variants (engine kept, engine restarted) are whole runs
one after the other, not alternating rounds: their ratio is as noisy as the machine."""

from __future__ import annotations

import shutil
from pathlib import Path

from iterate.bench.config import main_config
from iterate.store.paths import STAGES
from iterate.store.shards import read_json
from iterate.store.stage import DONE

# section timings (seconds) that a stage spends on setting up, not on its work
FIXED = {
    "update": ("load_s", "save_s"),
    "evaluate": ("load_s", "weights_load_s", "engine_start_s"),
    "handoff": ("merge_save_s",),
}


def breakdown(run: Path, i: int) -> dict:
    """Seconds per stage of iteration ``i`` and its fixed overheads. For generate that is
    everything but generating: the engine process's start and imports, the engine's start
    or the new weights' load, tokenizing and planning (``seconds - generate_s``)."""
    stages, fixed = {}, {}
    for s in STAGES:
        done = read_json(run / f"iter_{i:03d}" / s / DONE)
        if done is None:  # a stage this run does not have (the reward refresh)
            continue
        stages[s] = done["seconds"]
        timings = done.get("timings", {})
        if s == "generate":
            fixed["generate.engine_start_s"] = timings.get("engine_start_s", 0.0)
            fixed["generate.weights_load_s"] = timings.get("weights_load_s", 0.0)
            rest = (
                done["seconds"]
                - timings["sample_s"]
                - fixed["generate.engine_start_s"]
                - fixed["generate.weights_load_s"]
            )
            fixed["generate.process_and_setup_s"] = round(max(0.0, rest), 3)
        for k in FIXED.get(s, ()):
            if k in timings:
                fixed[f"{s}.{k}"] = timings[k]
    total = sum(stages.values())
    # every engine start of the run (a kept engine starts once, in the first stage that samples)
    starts = sum(
        read_json(p).get("timings", {}).get("engine_start_s", 0.0) for p in run.rglob(DONE)
    )
    return {
        "iteration": i,
        "stage_seconds": stages,
        "total_s": round(total, 2),
        "fixed": fixed,
        "fixed_s": round(sum(fixed.values()), 2),
        "fixed_share": sum(fixed.values()) / total,
        "run_engine_starts_s": round(starts, 2),
    }


def measure(out: Path, iterations: int, overrides: list[str], compare_restart: bool) -> dict:
    from iterate.run import loop

    results = {}
    rm = None
    variants = [("kept_engine", ["generate.keep_engine=true"])]
    if compare_restart:
        variants.append(("restarted_engine", ["generate.keep_engine=false"]))
    for name, extra in variants:
        rm_args = ["reward.train=false", f"reward.path={rm}"] if rm else []
        cfg = main_config(
            [
                *overrides,
                *extra,
                *rm_args,
                f"iteration={iterations}",
                f"runs_dir={out}",
                f"run_name={name}",
            ]
        )
        run = out / name
        shutil.rmtree(
            run, ignore_errors=True
        )  # a benchmark measures a fresh run, not a resumed one
        rows = loop.run(cfg, run)
        if not rows:
            raise RuntimeError(f"bench iteration: {run} has no finished iteration to break down")
        rm = rm or str(run / "reward_model" / "model")
        results[name] = breakdown(
            run, rows[-1]["iteration"]
        )  # the last one made (a KL rejection stops early)
    return results
