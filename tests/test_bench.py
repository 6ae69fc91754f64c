"""The benchmark harness in --quick mode: it runs end to end through its real CLI and writes
every section's figures. No speed thresholds (timings belong to the benchmark, not tests)."""

import json
import math
import subprocess
import sys

import pytest

from iterate.store.paths import STAGES

from .conftest import ROOT


@pytest.mark.slow
def test_bench_quick_writes_every_section(tmp_path, tiny_cache):
    """The quick smoke test through the real CLI, every default section and the peers
    (each measurement in the bench's own process)."""
    from iterate.bench.config import SECTIONS

    out = tmp_path / "bench"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "iterate.bench",
            "--quick",
            f"out_dir={out}",
            f"toy.cache_dir={tiny_cache}",
            f"sections=[{','.join(SECTIONS)},peers]",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "quick" / "results.json").read_text())
    assert res["quick"] and set(res["seconds"]) == {*SECTIONS, "peers", "total"}

    # Figures are timings (never asserted: machines are noisy); what is asserted is that
    # each is a measurement of the right kind and each ratio is its parts' ratio, which a
    # broken harness (a swapped baseline, a unit slip, a ratio left uncomputed) would miss.
    def positive(x):
        return isinstance(x, (int, float)) and math.isfinite(x) and x > 0

    def ratio(r, a, b):
        return r == pytest.approx(a / b, rel=1e-6)

    def rss(mb):  # a process with torch in it: hundreds of MB, not KB, not TB
        return positive(mb) and 100 < mb < 64_000

    (gen,) = res["generation"]
    assert gen["model"] == "toy" and gen["tokens_per_round"] == 4 * 4 * 8
    for k in ("vllm_tokens_per_s", "transformers_tokens_per_s", "matmul_gflops"):
        assert positive(gen[k]), k
    assert ratio(
        gen["vllm_over_transformers"], gen["vllm_tokens_per_s"], gen["transformers_tokens_per_s"]
    )
    (lab,) = res["labelling"]
    assert lab["max_abs_reward_difference"] < 1e-3, "both scorers give the same rewards"
    assert ratio(lab["ratio"], lab["batched_samples_per_s"], lab["pipeline_samples_per_s"])
    assert lab["mean_tokens"] > 1 and positive(lab["function_samples_per_s"])
    dpo = res["update"]["dpo"]
    assert positive(dpo["cached_step_s"]) and positive(dpo["recompute_step_s"])
    assert ratio(dpo["ratio"], dpo["cached_step_s"], dpo["recompute_step_s"])
    assert rss(dpo["cached_peak_rss_mb"])
    rl = res["update"]["rl"]["variants"]
    assert list(rl) == ["ppo", "grpo_kl"] and rl["grpo_kl"]["rule"] == "grpo"
    for v in rl.values():
        assert rss(v["peak_rss_mb"]) and v["steps"] >= 1 and v["responses"] >= 1
        assert 0 < v["step_s"] * v["steps"] <= v["seconds"], "a step's share of the stage"
    assert rl["grpo_kl"]["responses"] > rl["ppo"]["responses"], "a group per prompt"
    assert ratio(rl["grpo_kl"]["step_s_over_first"], rl["grpo_kl"]["step_s"], rl["ppo"]["step_s"])
    assert ratio(
        rl["grpo_kl"]["peak_rss_over_first"], rl["grpo_kl"]["peak_rss_mb"], rl["ppo"]["peak_rss_mb"]
    )
    assert "evaluation" not in res["backends"]  # quick: the rollouts only
    r = res["backends"]["rollouts"]
    assert positive(r["vllm_s"]) and positive(r["transformers_s"])
    assert ratio(r["transformers_over_vllm"], r["transformers_s"], r["vllm_s"])
    assert r["vllm_timings"]["sampler_sample_s"] > 0, "vLLM did the sampling"
    sync = res["sync"]
    assert all(positive(sync[v][k]) for v in ("merged", "lora") for k in ("sync_s", "tokens_per_s"))
    assert ratio(
        sync["lora_over_merged_tokens_per_s"],
        sync["lora"]["tokens_per_s"],
        sync["merged"]["tokens_per_s"],
    )
    w = res["workers"]
    g = w["generation"]
    (many,) = [k for k in g if k.endswith("x1_tokens_per_s")]
    (one,) = [k for k in g if k.startswith("1x") and k.endswith("_tokens_per_s")]
    assert ratio(g["ratio"], g[many], g[one]) and positive(w["update"]["step_ratio"])
    it = res["iteration"]["kept_engine"]
    assert set(it["stage_seconds"]) == set(STAGES) - {"reward"}  # the bench runs no refresh
    assert it["run_engine_starts_s"] > 0 and 0 < it["fixed_share"] < 1
    assert it["fixed_share"] == pytest.approx(it["fixed_s"] / it["total_s"], abs=0.01)
    assert "generation (tokens/s" in proc.stderr + proc.stdout, "the table is printed"
    # the peers: ours and TRL's DPO and GRPO steps on the same data; each ratio its parts',
    # ours profiled: operators in order of self time, the FLOP rate the step's FLOPs at its
    # unprofiled time
    pe = res["peers"]
    assert pe["trl"] == "1.16.0" and [(r["model"], r["step"]) for r in pe["rows"]] == [
        ("toy", "dpo"),
        ("toy", "grpo"),
    ]
    dpo_row, grpo_row = pe["rows"]
    assert set(dpo_row["step_s"]) == {"iterate", "trl"}
    assert set(grpo_row["step_s"]) == {"iterate (transformers)", "trl"}
    for r in pe["rows"]:
        for ours, x in r["trl_over"].items():
            assert x == pytest.approx(r["step_s"]["trl"] / r["step_s"][ours])
        ((ours, p),) = r["profile"].items()
        shares = [o["share"] for o in p["operators"]]
        assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-9
        assert any(o["name"] == "aten::mm" and o["gflop"] > 0 for o in p["operators"])
        assert p["achieved_gflops"] == pytest.approx(p["step_gflop"] / r["step_s"][ours])
        assert p["share_of_matmul_rate"] == pytest.approx(p["achieved_gflops"] / p["matmul_gflops"])
    assert "ours against TRL 1.16.0" in proc.stderr + proc.stdout


def test_the_peers_reward_and_step_clock():
    """The peers' shared reward takes the engine's keyword and TRL's alike (the share of
    distinct words); a step's time is the gap between one step's end and the next."""
    from iterate.bench import peers

    assert peers.reward(["p"], responses=["a b a"]) == [2 / 4]
    assert peers.reward(["p", "q"], completions=["x", ""]) == [1 / 2, 0.0]
    assert peers._steps([1.0, 3.0, 4.5, 5.0], warmup=1) == [1.5, 0.5]


def test_the_scale_sections_figures_from_a_runs_stage_records(tmp_path):
    """The scale section's arithmetic on stage records written here: seconds per 1,000
    responses, the main process's and the engine's peaks, the growth exponent between the
    two largest sizes (t ~ N^k), and the report's table; its prompts are distinct."""
    from iterate.bench import report, scale

    texts = scale.prompts(5000)
    assert len(set(texts)) == 5000 and texts == scale.prompts(5000)
    runs = {}
    for n, k in ((200, 0), (2000, 1)):
        run = tmp_path / f"n{n}"
        for i, s in enumerate(scale.LOOP):
            folder = run / "iter_000" / s
            folder.mkdir(parents=True)
            done = {"seconds": (i + 1) * 10.0**k, "peak_rss_mb": 900 + 10 * i + k}
            if s == "generate":
                done["timings"] = {"engine_peak_rss_mb": 700 + k}
            (folder / "_DONE.json").write_text(json.dumps(done))
        runs[str(n)] = scale.read_run(run, n * 8)
    assert runs["2000"]["stages"]["generate"] == {
        "seconds": 20.0,
        "s_per_1k_responses": 1.25,
        "peak_rss_mb": 911,
    }
    assert runs["2000"]["main_peak_rss_mb"] == 961 and runs["200"]["engine_peak_rss_mb"] == 700
    assert scale.growth((200, 2.0), (2000, 20.0)) == 1.0
    assert scale.growth((2000, 1.0), (20000, 100.0)) == 2.0 and scale.growth((1, 0), (2, 1)) is None
    sc = {
        "n": 8,
        "heldout": 80,
        "runs": runs,
        "exponent_between": [200, 2000],
        "exponents": {s: 1.0 for s in scale.LOOP},
        "main_peak_ratio": 1.07,
    }
    text = report.report({"scale": sc})
    assert "   update      5.0      50.0      3.125      1.00" in text
    assert "  main MB      960       961" in text and "main peak memory 1.07x" in text


@pytest.mark.slow
def test_the_padding_section_measures_the_tokens_fed_by_each_cut(tmp_path, tiny_cache):
    """A DPO epoch over pairs of mixed lengths as before and length-aware, each variant a
    process of its own through the real CLI: the real tokens are the pairs' own, the tokens
    fed are those of the cut replayed here, and the ratios are their parts'."""
    import torch

    from iterate.bench import update
    from iterate.bench.config import BenchConfig, apply_quick
    from iterate.store import seeds

    out = tmp_path / "bench"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "iterate.bench",
            "--quick",
            "sections=[padding]",
            f"out_dir={out}",
            f"toy.cache_dir={tiny_cache}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    pa = json.loads((out / "quick" / "results.json").read_text())["padding"]
    q = apply_quick(BenchConfig()).padding
    lengths = update.mixed_lengths(q.pairs, q.min_tokens, q.max_tokens, 0)
    assert all(
        q.min_tokens <= p + c <= q.max_tokens and q.min_tokens <= p + r <= q.max_tokens
        for p, c, r in lengths
    )
    real = sum(p + c + r for p, c, r in lengths)  # a pair's prompt is fed once
    before, both = pa["variants"]["as before"], pa["variants"]["both"]
    # as before: steps of 4 pairs, one micro-batch each
    assert before["real_tokens"] == both["real_tokens"] == real
    assert before["padding"] == pytest.approx(1 - real / before["fed_tokens"])
    # the pair rules' seeded shuffle, cut into steps of 4: the prompts padded to their
    # longest, both responses together to theirs
    order = torch.randperm(
        q.pairs, generator=torch.Generator().manual_seed(seeds.derive("update", 0, 0))
    ).tolist()
    fed = 0
    for s in range(0, q.pairs, 4):
        step = [lengths[j] for j in order[s : s + 4]]
        fed += 4 * max(p for p, _, _ in step) + 8 * max(max(c, r) for _, c, r in step)
    assert before["fed_tokens"] == fed
    assert real <= both["fed_tokens"] < before["fed_tokens"] and both["padding"] < before["padding"]
    assert both["train_s_over_first"] == pytest.approx(both["train_s"] / before["train_s"])
    assert 100 < both["peak_rss_mb"] < 64_000 and both["steps"] == before["steps"] == 2
    assert "of the tokens fed are padding" in proc.stderr + proc.stdout


def test_the_ladders_figures_from_a_runs_stage_records(tmp_path):
    """The ladder's arithmetic on stage records and model files written here: parameters
    from the safetensors headers, the README's estimate (2 bytes per parameter with LoRA,
    16 for the whole model), the update's peak (the GPU's where recorded, else the RSS), the
    bytes per parameter between two sizes, and the printed table."""
    import torch
    from safetensors.torch import save_file

    from iterate.bench import ladder, report

    model = tmp_path / "m"
    model.mkdir()
    save_file({"a": torch.zeros(3, 4), "b": torch.zeros(5)}, str(model / "model.safetensors"))
    assert ladder.parameters(str(model)) == 17
    assert ladder.predicted_mb(2**20, ["update=dpo"]) == 2
    assert ladder.predicted_mb(2**20, ["update=dpo", "update.lora.enabled=false"]) == 16
    run = tmp_path / "run"
    for name, done in (
        ("update", {"seconds": 4.0, "peak_rss_mb": 900, "peak_gpu_mb": 300}),
        ("generate", {"seconds": 2.5, "peak_rss_mb": 800}),
    ):
        (run / "iter_000" / name).mkdir(parents=True)
        (run / "iter_000" / name / "_DONE.json").write_text(json.dumps(done))
    (run / "iter_000" / "label").mkdir()  # a stage that did not finish: not read
    stages = ladder.read_run(run)
    assert stages == {
        "generate": {"seconds": 2.5, "peak_rss_mb": 800, "peak_gpu_mb": None},
        "update": {"seconds": 4.0, "peak_rss_mb": 900, "peak_gpu_mb": 300},
    }

    def entry(params, peak):
        readme = round(ladder.predicted_mb(params, ["update.lora.enabled=false"]))
        return {
            "parameters": params,
            "runs": {
                "dpo_full": {
                    "overrides": [],
                    "stages": stages,
                    "seconds": 6.5,
                    "update_peak_mb": peak,
                    "memory": "gpu",
                    "readme_mb": readme,
                }
            },
        }

    sizes = {"small": entry(100e6, 1000), "large": entry(500e6, 7000)}
    la = {"device": "cuda", "backend": "transformers", "dtype": "bfloat16", "sizes": sizes}
    la["slope_bytes_per_parameter"] = ladder.slopes(la["sizes"])
    assert la["slope_bytes_per_parameter"] == {"dpo_full": round(6000 * 2**20 / 400e6, 2)}
    text = report.report({"ladder": la})
    assert "peak GPU memory" in text and "dpo_full 15.7" in text
    (large,) = [line.split() for line in text.splitlines() if line.strip().startswith("large")]
    # size, parameters, variant, generate label pairs update evaluate handoff, MB, README MB
    assert large == ["large", "500M", "dpo_full", "2.5", "-", "-", "4.0", "-", "-", "7000", "7629"]


def test_the_bench_names_a_packaged_model_by_its_folder(tmp_path, monkeypatch):
    """A packaged real model (``iterate.packaged``) is a bench model by its name: its folder
    (made by the packaged model's own command, stood in for here); an unknown name is refused
    naming the known ones, the packaged included, before any model is built."""
    from iterate import packaged
    from iterate.bench import models as bm
    from iterate.config import ToyConfig

    made = []
    monkeypatch.setattr(packaged, "ensure", lambda name: made.append(name) or tmp_path / name)
    assert bm.policy_path("smollm2", ToyConfig()) == str(tmp_path / "smollm2")
    assert made == ["smollm2"]
    with pytest.raises(ValueError, match="known: toy, smollm2, llama30m"):
        bm.policy_path("nope", ToyConfig(cache_dir=str(tmp_path / "toy")))
    assert not (tmp_path / "toy").exists()
