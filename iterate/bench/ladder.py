"""Time and memory by model size: ``python -m iterate.bench sections=[ladder]`` runs one
iteration of the loop per random-weight Llama size (``ladder.sizes``, ``bench.models.SPECS``)
and per variant (``ladder.variants``: DPO with LoRA, DPO on the whole model, PPO), each a
run of the real program in a process of its own (``python -m iterate``) on a prompts file
written here, and reads back per stage the seconds and the peak memory (``_DONE.json``:
``peak_rss_mb``, and ``peak_gpu_mb`` on CUDA). Beside the update's measured peak it puts
what the README's rule of thumb predicts for that size (bf16 weights at 2 bytes per
parameter; full fine-tuning with AdamW at 16) and, between two sizes, the measured slope in
bytes per parameter. The same harness is the GPU check (``make gpu-check``): there with the
transformers sampler (no vLLM), on CUDA, at ~0.5B and ~1.5B parameters.

The models are built once from their configs (random weights, the toy tokenizer: speed and
memory do not depend on what the weights say); their reward model is the smallest size's
body with a fresh scalar head, the same for every run."""

from __future__ import annotations

import math
from pathlib import Path

from iterate.bench import models as bm
from iterate.bench import scale

# bytes per parameter in the README's memory estimates: weights alone (inference, LoRA,
# whose adapter is small) and full fine-tuning with AdamW (weights, gradients, two moments)
README_BYTES = {"weights": 2, "full": 16}


def parameters(path: str) -> int:
    """Parameters of the model saved at ``path``, from its safetensors headers (nothing
    loaded)."""
    from safetensors import safe_open

    total = 0
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            total += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    return total


def predicted_mb(params: int, variant_overrides: list[str]) -> float:
    """The README's estimate for a run's update: 16 bytes per parameter for full
    fine-tuning, else (LoRA) 2 for the bf16 weights; before activations."""
    full = "update.lora.enabled=false" in variant_overrides
    return params * README_BYTES["full" if full else "weights"] / 2**20


def read_run(run: Path) -> dict:
    """Per stage of the run's iteration 0 that ran: seconds and peak memory (the main
    process's RSS; on CUDA the allocator's peak too)."""
    return {
        name: {k: done.get(k) for k in ("seconds", "peak_rss_mb", "peak_gpu_mb")}
        for name, done in scale.stage_records(run).items()
    }


def measure(cfg, out: Path, toy: list[str]) -> dict:
    """One iteration per size and variant; the figures, the predictions and the slopes."""
    la = cfg.ladder
    source = out / "prompts.jsonl"
    scale.write_prompts(source, la.prompts + la.heldout)
    reward = bm.reward_path(la.reward_model, cfg.toy)
    res: dict = {"device": la.device, "backend": la.backend, "dtype": la.dtype, "sizes": {}}
    for size in la.sizes:
        path = bm.policy_path(size, cfg.toy)
        params = parameters(path)
        runs = {}
        for variant, overrides in la.variants.items():
            run = scale.run_program(
                out,
                f"{size}-{variant}",
                [
                    "~tuning",
                    f"model.path={path}",
                    f"model.dtype={la.dtype}",
                    f"model.max_length={la.max_length}",
                    f"device={la.device}",
                    f"generate.backend={la.backend}",
                    f"generate.n={la.n}",
                    f"generate.max_tokens={la.max_tokens}",
                    "reward.train=false",
                    f"reward.path={reward}",
                    "prompts=file",
                    f"prompts.path={source}",
                    f"prompts.per_iteration={la.prompts}",
                    f"prompts.heldout={la.heldout}",
                    "iteration=1",
                    f"seed={cfg.seed}",
                    "update.epochs=1",
                    *toy,
                    *overrides,
                ],
            )
            stages = read_run(run)
            update = stages["update"]
            gpu = update["peak_gpu_mb"]
            runs[variant] = {
                "overrides": list(overrides),
                "stages": stages,
                "seconds": round(sum(s["seconds"] for s in stages.values()), 2),
                "update_peak_mb": update["peak_rss_mb"] if gpu is None else gpu,
                "memory": "rss" if gpu is None else "gpu",
                "readme_mb": round(predicted_mb(params, overrides)),
            }
        res["sizes"][size] = {"parameters": params, "runs": runs}
    if len(res["sizes"]) >= 2:
        res["slope_bytes_per_parameter"] = slopes(res["sizes"])
    return res


def slopes(sizes: dict) -> dict[str, float]:
    """Per variant, the update's peak memory per parameter between the smallest and the
    largest size, in bytes: what a parameter more costs, the constant part left out."""
    first, *_, last = sizes.values()
    return {
        v: round(
            (last["runs"][v]["update_peak_mb"] - first["runs"][v]["update_peak_mb"])
            * 2**20
            / (last["parameters"] - first["parameters"]),
            2,
        )
        for v in first["runs"]
    }


def lines(la: dict) -> list[str]:
    """The ladder as a table: per size and variant, seconds per stage, the update's measured
    peak memory beside the README's estimate; then the slopes."""
    stages = ["generate", "label", "pairs", "update", "evaluate", "handoff"]
    head = ["size", "params", "variant", *stages, "update MB", "README MB"]
    rows = [head]
    for size, s in la["sizes"].items():
        for variant, r in s["runs"].items():
            rows.append(
                [
                    size,
                    f"{s['parameters'] / 1e6:.0f}M",
                    variant,
                    *(
                        f"{r['stages'][st]['seconds']:.1f}" if st in r["stages"] else "-"
                        for st in stages
                    ),
                    f"{r['update_peak_mb']:.0f}",
                    f"{r['readme_mb']:.0f}",
                ]
            )
    widths = [max(len(r[j]) for r in rows) for j in range(len(head))]
    memory = {"gpu": "peak GPU memory", "rss": "peak resident memory"}
    kind = next((r["memory"] for s in la["sizes"].values() for r in s["runs"].values()), "rss")
    out = [
        f"ladder: one iteration per size, {la['device']}, {la['dtype']}, {la['backend']} "
        f"sampler; seconds per stage, the update's {memory[kind]} (MB)"
    ]
    out += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    if slopes := la.get("slope_bytes_per_parameter"):
        out.append(
            "measured bytes per parameter between the sizes: "
            + ", ".join(f"{v} {b:.1f}" for v, b in slopes.items())
            + f" (README: {README_BYTES['weights']} with LoRA, {README_BYTES['full']} whole)"
        )
    return out
