"""The benchmark harness in --quick mode: it runs end to end through its real CLI and writes
every section's figures. No speed thresholds (timings belong to the benchmark, not tests)."""

import json
import math
import subprocess
import sys

import pytest

from iterate.paths import STAGES

from .conftest import ROOT


@pytest.mark.slow
def test_bench_quick_writes_every_section(tmp_path, tiny_cache):
    out = tmp_path / "bench"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "iterate.bench",
            "--quick",
            f"out_dir={out}",
            f"toy.cache_dir={tiny_cache}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "quick" / "results.json").read_text())
    assert res["quick"] and set(res["seconds"]) == {
        "generation",
        "labelling",
        "update",
        "backends",
        "sync",
        "iteration",
        "workers",
        "total",
    }

    def positive(x):
        return isinstance(x, (int, float)) and math.isfinite(x) and x > 0

    (gen,) = res["generation"]
    assert gen["model"] == "toy" and gen["tokens_per_round"] == 4 * 4 * 8
    for k in (
        "vllm_tokens_per_s",
        "transformers_tokens_per_s",
        "matmul_gflops",
        "vllm_over_transformers",
    ):
        assert positive(gen[k]), k
    (lab,) = res["labelling"]
    assert positive(lab["ratio"]) and lab["max_abs_reward_difference"] < 1e-3, (
        "both scorers give the same rewards"
    )
    dpo = res["update"]["dpo"]
    assert positive(dpo["cached_step_s"]) and positive(dpo["recompute_step_s"])
    assert positive(dpo["cached_peak_rss_mb"]) and positive(res["update"]["ppo"]["peak_rss_mb"])
    for kind in ("rollouts", "evaluation"):
        r = res["backends"][kind]
        assert (
            positive(r["vllm_s"])
            and positive(r["transformers_s"])
            and positive(r["transformers_over_vllm"])
        )
        assert r["vllm_timings"]["sampler_sample_s" if kind == "rollouts" else "sample_s"] > 0, (
            "vLLM did the sampling"
        )
    sync = res["sync"]
    assert all(positive(sync[v][k]) for v in ("merged", "lora") for k in ("sync_s", "tokens_per_s"))
    w = res["workers"]
    assert positive(w["generation"]["ratio"]) and positive(w["update"]["step_ratio"])
    assert all(positive(w["generation"][f"{k}_tokens_per_s"]) for k in ("1x2", "2x1"))
    it = res["iteration"]["kept_engine"]
    assert set(it["stage_seconds"]) == set(STAGES) - {"reward"}  # the bench runs no refresh
    assert it["run_engine_starts_s"] > 0 and 0 < it["fixed_share"] < 1
    assert "generation (tokens/s" in proc.stderr + proc.stdout, "the table is printed"
