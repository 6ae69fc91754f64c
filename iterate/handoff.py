"""Hand the updated policy to the next iteration: merge, save, measure, accept or reject.

1. Merge the LoRA adapter into the policy and ``save_pretrained`` it (safetensors +
   tokenizer) into ``handoff/policy/``.
2. Sample the held-out prompts with the new policy and measure KL(new || reference) per
   sequence with the k1 (``log p - log q``) and k3 (``r - 1 - log r``, ``r = q/p``) estimators
   (Schulman, "Approximating KL divergence", 2020), summed over response tokens.
3. Score the samples with the reward model and, in the toy world, the gold judge; the gold
   win rate is against the initial policy's samples of the same prompts.
4. Accept when k1 <= ``handoff.max_kl``; write ``kl.json`` with the decision and a model card.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pyarrow as pa
import torch

from iterate import generate, label, models, progress, report, reward_model
from iterate.config import Config, plain
from iterate.paths import Paths
from iterate.prompts import as_messages
from iterate.shards import SCHEMAS, Stage, atomic_write_json, read_shards

log = logging.getLogger(__name__)


def merge(cfg: Config, policy: str, update_dir: Path, out: Path) -> None:
    dev = models.device(str(cfg.device))
    if (update_dir / "adapter").exists():
        from peft import PeftModel

        base = models.load_policy(policy, str(cfg.model.dtype), dev)
        model = PeftModel.from_pretrained(base, update_dir / "adapter").merge_and_unload()
        tok_dir = update_dir / "adapter"
    else:
        model = models.load_policy(str(update_dir / "model"), str(cfg.model.dtype), dev)
        tok_dir = update_dir / "model"
    model.save_pretrained(out)
    models.load_tokenizer(str(tok_dir)).save_pretrained(out)


def sample_heldout(cfg: Config, policy: str, prompts: pa.Table, out: Path, seed: int) -> pa.Table:
    """``handoff.kl_samples`` samples per held-out prompt, as shards in ``out`` (resumable).

    Always at temperature 1 and top-p 1: the KL estimators need samples from the policy
    itself, not from a sharpened or truncated version of it."""
    tok = models.load_tokenizer(policy, cfg.model.chat_template)
    gc = cfg.generate
    shards, _ = generate.plan(tok, prompts, cfg.model.max_length - gc.max_tokens, gc.shard_size)
    todo = generate.missing(shards, out)
    if todo:
        job = generate.Job(
            policy=policy, out=str(out), iteration=-1, shards=todo, n=cfg.handoff.kl_samples,
            temperature=1.0, top_p=1.0, max_tokens=gc.max_tokens, max_length=cfg.model.max_length,
            seed=seed, dtype=str(cfg.model.dtype), batch_size=gc.batch_size, gpu_memory_utilization=0.0,
            enforce_eager=True, device=str(cfg.device),
        )  # fmt: skip
        generate.run_transformers(job)
    return read_shards(out, SCHEMAS["generate"])


@torch.no_grad()
def sequence_kl(cfg: Config, new: str, reference: str, samples: pa.Table) -> tuple[list[float], list[float]]:
    """Per-sequence k1 and k3 estimates of KL(new || reference) on samples from ``new``."""
    dev = models.device(str(cfg.device))
    tok = models.load_tokenizer(new, cfg.model.chat_template)
    prompts = [models.prompt_ids(tok, p) for p in samples["prompt"].to_pylist()]
    responses = samples["response_ids"].to_pylist()  # the sampled tokens themselves
    per_model = []
    for path in (new, reference):
        model = models.load_policy(path, str(cfg.model.dtype), dev)
        tokens = []
        for b in range(0, len(prompts), 32):
            ids, mask, resp = models.sequence_batch(tok, prompts[b : b + 32], responses[b : b + 32], dev)
            tokens.append((models.token_logps(model, ids, mask) * resp, resp))
        per_model.append(tokens)
        del model
    k1, k3 = [], []
    for (lp_new, resp), (lp_ref, _) in zip(*per_model):
        log_ratio = (lp_ref - lp_new) * resp  # log q/p per token
        k1 += (-log_ratio.sum(-1)).tolist()
        k3 += (((log_ratio.exp() - 1) - log_ratio) * resp).sum(-1).tolist()
    return k1, k3


def win_rate(new: list[float], old: list[float]) -> float:
    """P(new > old) + 0.5 P(tie), over aligned samples."""
    pairs = list(zip(new, old))
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / max(1, len(pairs))


def evaluate(cfg: Config, paths: Paths, policy: str, samples: pa.Table, rm_path: str) -> dict:
    """Reward and gold means of held-out samples, and the gold win rate vs the initial policy."""
    model, tok = reward_model.load_model(rm_path, str(cfg.reward.dtype))
    seqs = [
        reward_model.encode(tok, as_messages(p), r, cfg.reward.max_length)
        for p, r in zip(samples["prompt"].to_pylist(), samples["response"].to_pylist())
    ]
    rewards = reward_model.score(model, tok, seqs, desc="held-out reward")
    out = {
        "heldout_reward_mean": round(sum(rewards) / max(1, len(rewards)), 4),
        "response_tokens_mean": round(sum(samples["response_tokens"].to_pylist()) / max(1, samples.num_rows), 2),
        "eos_rate": round(samples["finish_reason"].to_pylist().count("stop") / max(1, samples.num_rows), 4),
    }
    gold = label.gold_scorer(cfg)
    if gold:
        new_gold = [gold(p, r) for p, r in zip(samples["prompt"].to_pylist(), samples["response"].to_pylist())]
        init = initial_samples(cfg, paths)
        init_gold = {
            (pid, j): gold(p, r)
            for pid, j, p, r in zip(*(init[c].to_pylist() for c in ("prompt_id", "sample_idx", "prompt", "response")))
        }
        keys = list(zip(samples["prompt_id"].to_pylist(), samples["sample_idx"].to_pylist()))
        out["gold_mean"] = round(sum(new_gold) / max(1, len(new_gold)), 4)
        out["initial_gold_mean"] = round(sum(init_gold.values()) / max(1, len(init_gold)), 4)
        out["win_rate_vs_initial"] = round(win_rate(new_gold, [init_gold[k] for k in keys]), 4)
    return out


def initial_samples(cfg: Config, paths: Paths) -> pa.Table:
    """The initial policy's held-out samples, drawn once per run (the win-rate baseline)."""
    from iterate import prompts

    held = prompts.heldout(cfg, paths)
    conf = {"policy": paths.base_policy, "kl_samples": cfg.handoff.kl_samples, "max_tokens": cfg.generate.max_tokens,
            "model": plain(cfg.model), "seed": cfg.seed}  # fmt: skip
    stage = Stage(paths.run / "heldout" / "initial_samples", "initial_samples", conf, inputs=[paths.run / "heldout"])
    if stage.check(cfg.force):
        return read_shards(stage.path, SCHEMAS["generate"])
    table = sample_heldout(cfg, paths.base_policy, held, stage.path, cfg.seed)
    stage.finish(rows_out=table.num_rows)
    return table


def run(cfg: Config, paths: Paths, i: int, policy: str, reference: str, rm_path: str, heldout: pa.Table, history: list[dict]) -> dict:
    hc = cfg.handoff
    conf = {"handoff": plain(hc), "policy": policy, "reference": reference, "reward_model": rm_path, "seed": cfg.seed}
    stage = Stage(paths.stage(i, "handoff"), "handoff", conf, inputs=[paths.stage(i, "update"), paths.run / "heldout"])
    if stage.check(cfg.force):
        return stage.read_done()
    timer = progress.Timer()
    out = stage.path / "policy"
    if not out.exists():  # merged into a temporary folder, renamed into place when complete
        tmp = stage.path / f".policy.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        with timer("merge_save_s"):
            merge(cfg, policy, paths.stage(i, "update"), tmp)
        os.replace(tmp, out)
    with timer("sample_s"):
        samples = sample_heldout(cfg, str(out), heldout, stage.path / "samples", cfg.seed)
    with timer("kl_s"):
        k1, k3 = sequence_kl(cfg, str(out), reference, samples)
    kl = {
        "k1": round(sum(k1) / len(k1), 5), "k3": round(sum(k3) / len(k3), 5),
        "max_kl": hc.max_kl, "sequences": len(k1), "reference": reference,
    }  # fmt: skip
    kl["accepted"] = kl["k1"] <= hc.max_kl
    kl["decision"] = "accept" if kl["accepted"] else f"reject ({hc.on_reject})"
    atomic_write_json(stage.path / "kl.json", kl)
    with timer("evaluate_s"):
        ev = evaluate(cfg, paths, str(out), samples, rm_path)
    report.write_card(out / "README.md", cfg, paths, i, history, {**kl, **ev})
    verb = "accepted" if kl["accepted"] else "REJECTED"
    log.info("handoff: KL(new || ref) k1 %.4f k3 %.4f (budget %.3g): %s", kl["k1"], kl["k3"], hc.max_kl, verb)
    return stage.finish(kl=kl, **ev, timings=timer.seconds)
