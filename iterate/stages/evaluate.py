"""Held-out evaluation: the initial policy's samples once per run (the win-rate baseline,
``<run>/heldout/initial_samples/``), then, per iteration, the new policy's
(``iter_i/evaluate/``).

The new policy is the iteration's starting policy with the update's LoRA adapter (or the
update's full model), loaded once: the run's sampler samples it (``Sampler.sync``: vLLM gets
the merged weights in place) and the KL is computed on it, before the handoff merges and
saves anything. ``evaluate.samples`` samples per held-out
prompt at temperature 1 and top-p 1, since the KL estimators need samples from the policy
itself, not a sharpened or truncated version of it. Measured on them:

- KL(new || reference) per sequence, k1 and k3 (``losses.kl_penalty``, Schulman 2020),
  summed over response tokens; the handoff gates on k1;
- the reward model's mean reward; in the toy world, the gold judge's mean, the gold win
  rate against the initial policy's samples of the same prompts, and the share of right
  answers (``correct_rate``, and the initial policy's);
- response length and EOS rate; prompts too long for the model dropped and counted.

Each sample's reward (and gold) is kept in ``iter_i/evaluate/scores/`` beside the samples.
"""

from __future__ import annotations

import logging

import pyarrow as pa
import torch

from iterate import losses, models, progress, rewards, sampling, winrate
from iterate.config import Config
from iterate.errors import BadInput
from iterate.paths import Paths
from iterate.reward_pool import RewardPool
from iterate.rewards import Reward
from iterate.shards import SCHEMAS, read_shards, shard_path, write_shard
from iterate.stage import Stage
from iterate.stages import heldout

log = logging.getLogger(__name__)


def sequence_kl(
    new_logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor
) -> dict[str, list[float]]:
    """Per-sequence KL(new || reference) estimates on samples from ``new``: the k1 and k3
    per-token estimators (``losses.kl_penalty``) summed over response tokens. All inputs
    (B, T), ``mask`` 1 on response tokens; returns ``{"k1": [B floats], "k3": [...]}``."""
    return {
        k: (losses.kl_penalty(new_logps, ref_logps, k) * mask).sum(-1).tolist()
        for k in ("k1", "k3")
    }


@torch.no_grad()
def logps_of(
    model, tok, prompts: list[list[int]], responses: list[list[int]], batch_size: int, dev
) -> tuple:
    """Per-token log-probs (B, T-1) of the responses and their mask, in batches."""
    lps, masks = [], []
    width = max(len(p) + len(r) for p, r in zip(prompts, responses)) - 1
    for b in range(0, len(prompts), batch_size):
        ids, mask, resp = models.sequence_batch(
            tok, prompts[b : b + batch_size], responses[b : b + batch_size], dev
        )
        lp = models.token_logps(model, ids, mask) * resp
        pad = (0, width - lp.shape[1])
        lps.append(torch.nn.functional.pad(lp, pad))
        masks.append(torch.nn.functional.pad(resp, pad))
    return torch.cat(lps), torch.cat(masks)


def kl(
    cfg: Config, tok, model, reference: str, policy: str, samples: pa.Table
) -> dict[str, list[float]]:
    """KL(new || reference) per sequence on the new policy's samples. When the reference is
    the policy the new one's LoRA adapter sits on, it is the same model with the adapter
    disabled (no second copy)."""
    dev = next(model.parameters()).device
    prompts = [models.prompt_ids(tok, p) for p in samples["prompt"].to_pylist()]
    responses = samples["response_ids"].to_pylist()  # the sampled tokens themselves
    bs = cfg.evaluate.batch_size
    new, mask = logps_of(model, tok, prompts, responses, bs, dev)
    ref_model = None  # the new policy's own base, its adapter disabled
    if not (hasattr(model, "disable_adapter") and reference == policy):
        ref_model = models.load_policy(reference, str(cfg.model.dtype), dev)
    with models.reference_of(model, ref_model) as ref:
        ref_lps, _ = logps_of(ref, tok, prompts, responses, bs, dev)
    return sequence_kl(new, ref_lps, mask)


def main_figures(judges: dict[str, dict]) -> dict:
    """The figures the loop reports and gates on, from the gold judge where the prompts
    have one, else from the run's reward: the win rate's standard error and ties, the
    length-controlled win rate (``iterate.winrate``), each side's mean length in characters
    and their ratio (new over reference)."""
    main = judges.get("gold") or judges.get("reward") or {}
    if not main:
        return {}
    ref = main["reference_length"]
    return {
        "main_judge": "gold" if judges.get("gold") else "reward",
        "win_rate_se": main["win_rate_se"],
        "win_ties": main["ties"],
        "lc_win_rate": main["lc_win_rate"],
        "lc_win_rate_se": main["lc_win_rate_se"],
        "length_chars": main["new_length"],
        "reference_length_chars": ref,
        "length_ratio": round(main["new_length"] / ref, 4) if ref else None,
    }


def _mean(xs: list[float]) -> float:
    return round(sum(xs) / max(1, len(xs)), 5)


def scores(cfg: Config, paths: Paths, samples: pa.Table, reward: Reward) -> tuple[dict, pa.Table]:
    """Reward and gold means of held-out samples, and the win rates vs the initial policy's
    samples of the same prompts under the reward model (proxy) and the gold judge. Their
    difference, ``proxy_gold_gap``, is over-optimisation on one scale: the proxy says the
    policy beats the initial one more often than the gold judge does. Also each sample's
    reward, spread and gold, in the label stage's schema (what the run inspector and the
    trackers' sample tables read)."""
    init = read_shards(paths.initial_samples_dir, SCHEMAS["generate"])
    tables = {"new": samples, "init": init}
    rows = cfg.generate.shard_size * cfg.evaluate.samples  # a shard's worth, however many workers
    jobs = [(t, s) for t in tables for s in range(0, tables[t].num_rows, rows)]

    def texts(job: tuple[str, int]) -> tuple[list, list]:
        t = tables[job[0]].slice(job[1], rows)
        return t["prompt"].to_pylist(), t["response"].to_pylist()

    got: dict[tuple, tuple[list, list]] = {}
    with RewardPool(reward, cfg.reward.workers, cfg.reward.threads) as pool:
        pool.score_each(jobs, texts, got.__setitem__, desc="held-out reward", detail=True)
    by_table = {t: [r for j in jobs if j[0] == t for r in got[j][0]] for t in tables}
    per_row = [x for j in jobs if j[0] == "new" for x in got[j][1]]
    spread = [x for x in per_row if x is not None]
    scored = by_table["new"]
    new_gold = None
    out = {"heldout_reward_mean": _mean([r for r in scored if r is not None and r == r])}
    if spread:
        out["heldout_reward_std"] = _mean(spread)
    if refused := sum(r is None for r in scored):  # the reward model's template refused them
        out["reward_template_refused"] = refused
    key = lambda t: list(zip(t["prompt_id"].to_pylist(), t["sample_idx"].to_pylist()))  # noqa: E731
    new_keys, init_keys = key(samples), key(init)
    new_len = [len(r) for r in samples["response"].to_pylist()]
    init_len = dict(zip(init_keys, (len(r) for r in init["response"].to_pylist())))
    judges: dict[str, dict] = {}

    def judge(name: str, prefs: list) -> None:
        """A judge's figures from its preferences per new sample (None: not judged)."""
        rows = [(p, n, init_len[k]) for p, n, k in zip(prefs, new_len, new_keys, strict=True)
                if p is not None and p == p and k in init_len]  # fmt: skip
        judges[name] = winrate.figures(*map(list, zip(*rows))) if rows else {}

    init_reward = dict(zip(init_keys, by_table["init"]))
    ok = lambda x: x is not None and x == x  # noqa: E731  (None: refused; NaN: unscored)
    judge("reward", [winrate.preference(r, init_reward[k]) if ok(r) and ok(init_reward.get(k))
                     else None for r, k in zip(scored, new_keys)])  # fmt: skip
    if getattr(reward, "compares", False):  # a pairwise model or judge is asked: new or old?
        init_rows = dict(zip(init_keys, init["response"].to_pylist()))
        at = [j for j, k in enumerate(new_keys) if k in init_rows]
        if at:  # (its tournament rewards average one half: its mean preference instead)
            prompts, responses = samples["prompt"].to_pylist(), samples["response"].to_pylist()
            prefs = reward.prefer(
                [prompts[j] for j in at], [responses[j] for j in at],
                [init_rows[new_keys[j]] for j in at], desc="held-out preference",
            )  # fmt: skip
            if unjudged := sum(p != p for p in prefs):  # a judge that never answered: NaN
                out["judge_unjudged"] = unjudged
            by_row: list = [None] * len(new_keys)
            for j, p in zip(at, prefs, strict=True):
                by_row[j] = p
            judge("reward", by_row)
            out["heldout_reward_mean"] = _mean([p for p in prefs if p == p])
    out["proxy_win_rate"] = judges["reward"].get("win_rate")
    text = lambda t: (t["prompt"].to_pylist(), t["response"].to_pylist())  # noqa: E731
    if gold := rewards.of(cfg, "gold"):
        init_gold = dict(zip(init_keys, gold.score(*text(init), desc="held-out gold")))
        new_gold = gold.score(*text(samples), desc="held-out gold")
        out["gold_mean"] = _mean(new_gold)
        out["initial_gold_mean"] = _mean(list(init_gold.values()))
        judge("gold", winrate.judged(new_gold, [init_gold[k] for k in new_keys]))
        out["win_rate_vs_initial"] = judges["gold"]["win_rate"]
        if out["proxy_win_rate"] is not None:
            out["proxy_gold_gap"] = round(out["proxy_win_rate"] - out["win_rate_vs_initial"], 4)
    out.update(main_figures(judges), judges=judges)
    if correct := rewards.of(cfg, "correct"):  # the share of right answers, new and initial
        out["correct_rate"] = _mean(correct.score(*text(samples), desc="held-out answers"))
        out["initial_correct_rate"] = _mean(correct.score(*text(init), desc="initial answers"))
    each = {
        "prompt_id": samples["prompt_id"],
        "sample_idx": samples["sample_idx"],
        "reward": scored,
        "gold": new_gold or [None] * len(scored),
        "reward_std": per_row,
    }
    return out, pa.table(each, schema=SCHEMAS["label"])


def new_policy(cfg: Config, paths: Paths, i: int, policy: str):
    """The policy the update of iteration i made: its starting policy with the LoRA adapter
    on top (not merged), or the update's full model."""
    (trained, adapter), dev = paths.trained_policy(i), models.device(str(cfg.device))
    if adapter:
        return models.load_policy(policy, str(cfg.model.dtype), dev, str(trained))
    return models.load_policy(str(trained), str(cfg.model.dtype), dev)


def run(cfg: Config, paths: Paths, i: int, policy: str, reference: str) -> dict:
    dev = models.device(str(cfg.device))
    reward = rewards.of(cfg, path=paths.reward_model, device=dev, run=paths.run)
    conf = {
        **heldout.sample_conf(cfg),
        "policy": policy,
        "reference": reference,
        "reward": reward.identity(),
    }
    stage = Stage(
        paths.stage(i, "evaluate"),
        "evaluate",
        conf,
        inputs=[paths.stage(i, "update"), paths.heldout_dir],
    )
    if stage.check(cfg.force):
        return stage.read_done()
    timer = progress.Timer()
    tok = models.load_tokenizer(policy, cfg.model.chat_template)
    with timer("load_s"):
        model = new_policy(cfg, paths, i, policy)
    with timer("sample_s"):
        put = lambda sampler: sampler.sync(model, tok, policy)  # noqa: E731
        samples, info = heldout.sample(
            cfg, tok, read_shards(paths.heldout_dir), paths.evaluation_samples(i), i + 1, put
        )
    if samples.num_rows == 0:
        raise BadInput(
            f"evaluate: every held-out prompt is too long for model.max_length ({info['dropped']})"
        )
    with timer("kl_s"):
        per_seq = kl(cfg, tok, model, reference, policy, samples)
    with timer("score_s"):
        measured, each = scores(cfg, paths, samples, reward)
    write_shard(each, shard_path(paths.evaluation_scores(i), 0))
    kl_info = {
        "k1": _mean(per_seq["k1"]),
        "k3": _mean(per_seq["k3"]),
        "sequences": len(per_seq["k1"]),
        "reference": reference,
    }
    return stage.finish(
        kl=kl_info,
        rows_out=samples.num_rows,
        dropped=info["dropped"],
        **measured,
        **sampling.summary(samples),
        timings={**info["timings"], **timer.seconds},
    )
