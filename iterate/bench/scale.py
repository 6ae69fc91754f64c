"""How one iteration's cost grows with its prompts: ``python -m iterate.bench
sections=[scale]`` runs one iteration of the toy loop (the toy policy and its reward model,
DPO, best-of-``n``) at each of ``scale.sizes`` prompts, each a run of the real program in a
process of its own (``python -m iterate``) on a prompts file written here, and reads back
per stage the seconds, the seconds per 1,000 responses and the main process's peak memory
(``_DONE.json``: ``seconds``, ``peak_rss_mb``), and the vLLM engine's peak memory (the
generate stage's ``engine_peak_rss_mb``). Between the two largest sizes it fits each
stage's growth exponent, ``log(t2 / t1) / log(N2 / N1)``: 1 is linear.

The prompts are unique texts in the toy world's grammar (arithmetic with numbers past the
toy world's own, counting ranges, greetings by name), so the toy tokenizer reads them; they
are not toy-world prompts, so there is no gold judge and no reward-model refresh."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

from iterate.store.shards import read_json
from iterate.store.stage import DONE

LOOP = ("prompts", "generate", "label", "pairs", "update", "evaluate", "handoff")


def prompts(count: int) -> list[str]:
    """``count`` distinct prompts in the toy world's grammar, in a fixed order."""
    from iterate.toy import world

    out, a = [], 0
    names = sorted(world.NAMES)
    while len(out) < count:
        b = a * 7 % 1000
        out += [
            f"What is {a} plus {b}?",
            f"What is {a + b} minus {b}?",
            f"Count from {a} to {a + 2 + a % 5}.",
            f"Greet {names[a % len(names)]} {a}.",
        ]
        a += 1
    return out[:count]


_TEMPLATES = (
    "Write a short story about a {a} {n} who wants to {v} the {m}.",
    "Explain how a {a} {n} can {v} a {m} in simple words.",
    "What is the best way to {v} a {a} {m} for a {n}?",
    "Give me three reasons why a {n} should {v} the {a} {m}.",
    "Describe the {a} {m} of a {n} and how to {v} it.",
)
_WORDS = {
    "a": "quiet bright old young strange gentle busy hidden golden tiny".split(),
    "n": "farmer pilot teacher robot painter doctor sailor child baker poet".split(),
    "v": "fix paint find build clean visit study sell measure protect".split(),
    "m": "garden bridge engine river castle violin market forest lantern window".split(),
}


def english_prompts(count: int, seed: int = 0) -> list[str]:
    """``count`` English-like prompts from a few templates and a small vocabulary (seeded):
    the case that slows a near-duplicate check, since most prompts share grams."""
    import random

    rng, out, seen = random.Random(seed), [], set()
    while len(out) < count:
        words = {k: rng.choice(v) for k, v in _WORDS.items()}
        text = (
            rng.choice(_TEMPLATES).format(**words) + f" Keep it under {rng.randint(20, 400)} words."
        )
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def near_duplicates(known_sizes: list[int], candidates: int = 500) -> list[dict]:
    """Candidates checked per second by the self-instruct near-duplicate filter
    (``synthetic.Known``, 3-gram Jaccard above 0.7) with this many known prompts, the
    prefix filter against a scan of every prompt sharing a gram (``above=0``)."""
    import time

    from iterate import synthetic

    rows = []
    for size in known_sizes:
        texts = english_prompts(size + candidates, seed=size)
        known = synthetic.Known(texts[:size])
        row = {"known": size}
        for name, above in (("prefix", 0.7), ("every_shared_gram", 0.0)):
            t = time.perf_counter()
            hits = sum(known.overlap(c, above) > 0.7 for c in texts[size:])
            row[f"{name}_per_s"] = round(candidates / (time.perf_counter() - t), 1)
            row[f"{name}_near"] = hits
        row["speedup"] = round(row["prefix_per_s"] / row["every_shared_gram_per_s"], 2)
        rows.append(row)
    return rows


def write_prompts(path: Path, count: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts(count)))


def growth(small: tuple[int, float], large: tuple[int, float]) -> float | None:
    """The exponent ``k`` of ``t ~ N^k`` through two (N, t) points; None where a time is 0."""
    (n1, t1), (n2, t2) = small, large
    if t1 <= 0 or t2 <= 0 or n1 == n2:
        return None
    return round(math.log(t2 / t1) / math.log(n2 / n1), 3)


def run_program(out: Path, name: str, args: list[str]) -> Path:
    """``python -m iterate`` with ``args`` as a fresh run ``out/name`` (a benchmark measures
    a fresh run, not a resumed one), in a process of its own; its folder."""
    run = out / name
    shutil.rmtree(run, ignore_errors=True)
    cmd = [sys.executable, "-m", "iterate", f"runs_dir={out}", f"run_name={name}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"bench: the run {name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
        )
    return run


def stage_records(run: Path) -> dict[str, dict]:
    """The ``_DONE.json`` of every stage of the run's iteration 0 that finished."""
    folders = sorted((run / "iter_000").iterdir())
    return {f.name: read_json(f / DONE) for f in folders if (f / DONE).exists()}


def read_run(run: Path, n: int) -> dict:
    """Per loop stage of the run's iteration 0: seconds, seconds per 1,000 responses, the
    main process's peak memory; and the engine's peak memory."""
    done = stage_records(run)
    if missing := [s for s in LOOP if s not in done]:
        raise RuntimeError(f"bench scale: {run} has no finished {', '.join(missing)}")
    stages = {
        s: {
            "seconds": done[s]["seconds"],
            "s_per_1k_responses": round(1000 * done[s]["seconds"] / n, 4),
            "peak_rss_mb": done[s].get("peak_rss_mb"),
        }
        for s in LOOP
    }
    return {
        "responses": n,
        "stages": stages,
        "main_peak_rss_mb": max(v["peak_rss_mb"] or 0 for v in stages.values()),
        "engine_peak_rss_mb": done["generate"].get("timings", {}).get("engine_peak_rss_mb"),
    }


def measure(cfg, out: Path, toy: list[str]) -> dict:
    """One iteration per size in ``cfg.scale.sizes``; the figures and the exponents."""
    sc = cfg.scale
    runs: dict[str, dict] = {}
    # a run of the smallest size first, not counted: it builds the toy world and trains the
    # reward model (both cached for the others), whose memory would stay in its process
    warm = [("warmup", min(sc.sizes))] if sc.warmup else []
    for name, size in [*warm, *((str(s), s) for s in sc.sizes)]:
        source = out / "prompts" / f"prompts_{size}.jsonl"
        write_prompts(source, size + sc.heldout)
        run = run_program(
            out,
            "warmup" if name == "warmup" else f"n{size}",
            [
                "prompts=file",
                f"prompts.path={source}",
                f"prompts.per_iteration={size}",
                f"prompts.heldout={sc.heldout}",
                f"generate.n={sc.n}",
                "iteration=1",
                f"seed={cfg.seed}",
                *toy,
                *sc.overrides,
            ],
        )
        if name != "warmup":
            runs[name] = read_run(run, size * sc.n)
    sizes = [str(s) for s in sc.sizes]
    res: dict = {"n": sc.n, "heldout": sc.heldout, "runs": runs}
    if len(sizes) >= 2:
        a, b = runs[sizes[-2]], runs[sizes[-1]]
        na, nb = int(sizes[-2]), int(sizes[-1])
        res["exponents"] = {
            s: growth((na, a["stages"][s]["seconds"]), (nb, b["stages"][s]["seconds"]))
            for s in LOOP
        }
        res["exponent_between"] = [na, nb]
        res["main_peak_ratio"] = round(b["main_peak_rss_mb"] / a["main_peak_rss_mb"], 3)
    return res
