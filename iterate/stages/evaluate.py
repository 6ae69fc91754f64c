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
- response length and EOS rate; prompts too long for the model dropped and counted;
- every pointwise judge's mean score of the new and the initial samples (``judge_means``,
  standard errors clustered by prompt): with a checker as judge, an accuracy.

Each sample's reward (and gold) is kept in ``iter_i/evaluate/scores/`` beside the samples.
"""

from __future__ import annotations

import logging

import pyarrow as pa
import torch

from iterate import progress, rewards, winrate
from iterate.config import Config, plain
from iterate.errors import BadInput
from iterate.rewards import Reward
from iterate.rewards.pool import RewardPool
from iterate.sampling import samplers
from iterate.stages import heldout
from iterate.store.paths import Paths
from iterate.store.shards import SCHEMAS, read_shards, shard_path, write_shard
from iterate.store.stage import Stage
from iterate.train import losses, models

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
    model, pad_id: int, prompts: list[list[int]], responses: list[list[int]], batch_size: int, dev
) -> tuple:
    """Per-token log-probs (B, R) of the responses and their mask, in batches, each prompt
    run once and given no logits (``models.shared_prompt_logps``)."""
    lps, masks = [], []
    width = max(map(len, responses))
    for b in range(0, len(prompts), batch_size):
        ((_, lp, resp),) = models.shared_prompt_logps(
            model, pad_id, prompts[b : b + batch_size], [responses[b : b + batch_size]], dev
        )
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
    new, mask = logps_of(model, tok.pad_token_id, prompts, responses, bs, dev)
    ref_model = None  # the new policy's own base, its adapter disabled
    if not (hasattr(model, "disable_adapter") and reference == policy):
        ref_model = models.load_policy(reference, str(cfg.model.dtype), dev)
    with models.reference_of(model, ref_model) as ref:
        ref_lps, _ = logps_of(ref, tok.pad_token_id, prompts, responses, bs, dev)
    return sequence_kl(new, ref_lps, mask)


def main_judge(cfg: Config, judges: dict[str, dict]) -> str:
    """The judge the loop reports and gates on: the gold judge where the prompts have one,
    else the first of ``evaluate.judges``, else the run's reward."""
    named = [rewards.source_name(p) for p in cfg.evaluate.judges]
    return next(n for n in ("gold", *named, "reward") if judges.get(n) or n == "reward")


def main_figures(judges: dict[str, dict], main: str) -> dict:
    """The figures the loop reports and gates on, ``main``'s against the reference: the win
    rate, its standard error and ties, the length-controlled win rate
    (``iterate.winrate``), each side's mean length in characters and their ratio (new over
    reference)."""
    figs = judges.get(main) or {}
    if not figs:
        return {}
    ref = figs["reference_length"]
    return {
        "main_judge": main,
        "win_rate": figs["win_rate"],
        "win_rate_se": figs["win_rate_se"],
        "win_ties": figs["ties"],
        "lc_win_rate": figs["lc_win_rate"],
        "lc_win_rate_se": figs["lc_win_rate_se"],
        "length_chars": figs["new_length"],
        "reference_length_chars": ref,
        "length_ratio": round(figs["new_length"] / ref, 4) if ref else None,
    }


def _mean(xs: list[float]) -> float:
    return round(sum(xs) / max(1, len(xs)), 5)


def is_score(x) -> bool:
    return x is not None and x == x  # None: refused by a template; NaN: unscored or unjudged


def _text(t: pa.Table) -> tuple[list, list]:
    return t["prompt"].to_pylist(), t["response"].to_pylist()


def judged_against(
    judge, points: tuple[list, list] | None, samples: pa.Table, r: heldout.Reference, desc: str
) -> dict:
    """A judge's win-rate figures (``winrate.figures``, errors clustered by prompt) for the
    new ``samples`` against the responses of ``r`` that its index aligns with them. A
    pointwise judge's scores (``points``: of the new samples and of ``r``'s) are compared,
    a higher score winning; a comparing judge (``points`` None) is asked. A preference that
    is not a number (a judge that never answered) is counted as ``unjudged``, not as a
    loss."""
    at = [j for j, k in enumerate(r.index) if k is not None]
    old = r.table["response"].to_pylist()
    if points is None:
        prompts, responses = _text(samples)
        asked = judge.prefer(
            [prompts[j] for j in at],
            [responses[j] for j in at],
            [old[r.index[j]] for j in at],
            desc=desc,
        )
        prefs = dict(zip(at, asked, strict=True))
    else:
        new, theirs = points
        prefs = {
            j: winrate.preference(new[j], theirs[r.index[j]])
            for j in at
            if is_score(new[j]) and is_score(theirs[r.index[j]])
        }
    new_len = [len(x) for x in samples["response"].to_pylist()]
    prompt_ids = samples["prompt_id"].to_pylist()  # a prompt's samples: one cluster
    pairs = [
        (p, new_len[j], len(old[r.index[j]]), prompt_ids[j])
        for j, p in prefs.items()
        if is_score(p)
    ]
    figs = winrate.figures(*map(list, zip(*pairs))) if pairs else {}
    if unjudged := sum(not is_score(p) for p in prefs.values()):
        figs["unjudged"] = unjudged
    return figs


def _gold_figures(new: list, init: list, versus_initial: dict, out: dict) -> dict:
    """The toy world's gold figures: the held-out mean, the initial policy's, the gold win
    rate against it, and the proxy's win rate minus gold's (over-optimisation)."""
    figs = {
        "gold_mean": _mean(new),
        "initial_gold_mean": _mean(init),
        "win_rate_vs_initial": versus_initial["win_rate"],
    }
    if out["proxy_win_rate"] is not None:
        figs["proxy_gold_gap"] = round(out["proxy_win_rate"] - figs["win_rate_vs_initial"], 4)
    return figs


def scores(
    cfg: Config,
    paths: Paths,
    samples: pa.Table,
    reward: Reward,
    ref: heldout.Reference,
    prev: heldout.Reference | None = None,
) -> tuple[dict, pa.Table]:
    """What the judges say of the held-out samples: the reward's mean (and gold's, in the toy
    world), and per judge (the run's reward, the gold judge, ``evaluate.judges``) the win
    rates (``winrate.figures``) against the reference ``ref``, under ``judges``; the main
    judge's figures flat (``main_figures``). Against the initial policy's samples, whatever
    the reference, ``proxy_win_rate`` (the reward's) and ``win_rate_vs_initial`` (gold's):
    their difference, ``proxy_gold_gap``, is over-optimisation on one scale (the proxy says
    the policy beats the initial one more often than the gold judge does). Against the
    samples of the policy the iteration started from (``prev``; None or a ``table`` of None:
    the initial policy's), the reward's win rate, ``vs_previous``: what the handoff asks of
    a new policy, that it does not lose to the one it would replace. A pointwise judge
    scores both sides, a higher score wins and equal ones tie; a comparing one (a pairwise
    model, a comparing judge) is asked, both orders. Also each sample's reward, spread and
    gold, in the label stage's schema (what the run inspector and the trackers' sample
    tables read)."""
    init = read_shards(paths.initial_samples_dir, SCHEMAS["generate"])
    against = {"init": heldout.Reference(init, heldout.aligned(samples, init), {})}
    if ref.table is not None:  # (None: the initial samples themselves)
        against["ref"] = ref
    if prev is not None and prev.table is not None and ref.info["kind"] != "previous":
        against["prev"] = prev  # (the reference already, where that is the previous policy)
    tables = {"new": samples, **{k: r.table for k, r in against.items()}}
    by_table, per_row = reward_scores(cfg, reward, tables)
    spread = [x for x in per_row if x is not None]
    scored = by_table["new"]
    out = {"heldout_reward_mean": _mean([r for r in scored if is_score(r)])}
    if spread:
        out["heldout_reward_std"] = _mean(spread)
    if refused := sum(r is None for r in scored):  # the reward model's template refused them
        out["reward_template_refused"] = refused
    # judge name -> (the judge, its scores of each table; None: a comparing judge, asked)
    judges: dict[str, tuple] = {"reward": (reward, None if compares(reward) else by_table)}
    judged = {t: x for t, x in tables.items() if t != "prev"}  # (only the reward meets prev)
    judges.update(_other_judges(cfg, paths, judged))

    def versus(name: str, side: str) -> dict:
        judge, points = judges[name]
        theirs = None if points is None else (points["new"], points[side])
        return judged_against(judge, theirs, samples, against[side], f"held-out {name} ({side})")

    side = "ref" if "ref" in against else "init"
    figures = {name: versus(name, side) for name in judges}
    out["judge_means"] = {
        name: means(points["new"], samples, points["init"], init)
        for name, (_, points) in judges.items()
        if points is not None
    }
    initial = (
        figures
        if side == "init"
        else {n: versus(n, "init") for n in ("reward", "gold") if n in judges}
    )
    last = "prev" if "prev" in against else "ref" if ref.info["kind"] == "previous" else None
    before = versus("reward", last) if last in against else initial["reward"]
    out["vs_previous"] = {
        "iteration": (prev.info if prev else {}).get("iteration"),
        **{k: before[k] for k in ("win_rate", "win_rate_se", "ties", "prompts") if k in before},
    }
    if judges["reward"][1] is None:  # a comparing reward's scores are tournament shares
        out["heldout_reward_mean"] = initial["reward"].get("win_rate")  # (mean one half)
        if unjudged := initial["reward"].get("unjudged"):
            out["judge_unjudged"] = unjudged
    out["proxy_win_rate"] = initial["reward"].get("win_rate")
    new_gold = judges["gold"][1]["new"] if "gold" in judges else None
    if new_gold is not None:
        out.update(_gold_figures(new_gold, judges["gold"][1]["init"], initial["gold"], out))
    out.update(main_figures(figures, main_judge(cfg, figures)), judges=figures)
    out["reference"] = {"kind": "initial", **ref.info}
    if correct := rewards.of(cfg, "correct"):  # the share of right answers, new and initial
        out["correct_rate"] = _mean(correct.score(*_text(samples), desc="held-out answers"))
        out["initial_correct_rate"] = _mean(correct.score(*_text(init), desc="initial answers"))
    each = {
        "prompt_id": samples["prompt_id"],
        "sample_idx": samples["sample_idx"],
        "reward": scored,
        "gold": new_gold or [None] * len(scored),
        "reward_std": per_row,
    }
    return out, pa.table(each, schema=SCHEMAS["label"])


def reward_scores(cfg: Config, reward: Reward, tables: dict) -> tuple[dict, list]:
    """The run's reward of every table's rows, in shard-sized jobs over its scoring workers:
    (table -> rewards, the new samples' spreads)."""
    rows = cfg.generate.shard_size * cfg.evaluate.samples  # a shard's worth, however many workers
    jobs = [(t, s) for t in tables for s in range(0, tables[t].num_rows, rows)]
    got: dict[tuple, tuple[list, list]] = {}
    with RewardPool(reward, cfg.reward.workers, cfg.reward.threads) as pool:
        texts = lambda job: _text(tables[job[0]].slice(job[1], rows))  # noqa: E731
        pool.score_each(jobs, texts, got.__setitem__, desc="held-out reward", detail=True)
    by_table = {t: [r for j in jobs if j[0] == t for r in got[j][0]] for t in tables}
    return by_table, [x for j in jobs if j[0] == "new" for x in got[j][1]]


def _other_judges(cfg: Config, paths: Paths, tables: dict) -> dict[str, tuple]:
    """The gold judge (in the toy world) and ``evaluate.judges``, by name: (the judge, its
    scores of each table; None for a comparing judge, which is asked instead)."""
    out: dict[str, tuple] = {}
    if gold := rewards.of(cfg, "gold"):
        out["gold"] = (
            gold,
            {t: gold.score(*_text(x), desc=f"held-out gold ({t})") for t, x in tables.items()},
        )
    dev = models.device(str(cfg.device))
    for part in cfg.evaluate.judges:
        judge = rewards.of(cfg, "evaluator", device=dev, run=paths.run, part=part)
        name = rewards.source_name(part)
        points = (
            None
            if compares(judge)
            else {
                t: judge.score(*_text(x), desc=f"held-out {name} ({t})") for t, x in tables.items()
            }
        )
        out[name] = (judge, points)
    return out


def means(new: list, samples: pa.Table, initial: list, init: pa.Table) -> dict:
    """A pointwise judge's mean score of the new policy's held-out samples and of the initial
    policy's, each with its standard error clustered by prompt (``winrate.clustered_se``): a
    judge that scores 1 or 0 (a checker: was every constraint kept?) gives an accuracy. And
    the gain, paired by prompt: the mean over the prompts both scored of (the new policy's
    mean on the prompt less the initial one's), with its standard error over prompts; a
    prompt's difficulty cancels in the difference, so the gain's error is smaller than
    either mean's."""
    out, by_prompt = {}, {}
    for key, scores, table in (("mean", new, samples), ("initial_mean", initial, init)):
        ids = table["prompt_id"].to_pylist()
        kept = [(x, i) for x, i in zip(scores, ids, strict=True) if is_score(x)]
        if kept:
            values, by = map(list, zip(*kept))
            out[key] = round(sum(values) / len(values), 4)
            out[f"{key}_se"] = round(winrate.clustered_se(values, by), 4)
        per: dict[str, list] = {}
        for x, i in kept:
            per.setdefault(i, []).append(x)
        by_prompt[key] = {i: sum(v) / len(v) for i, v in per.items()}
    both = [i for i in by_prompt["mean"] if i in by_prompt["initial_mean"]]
    if both:
        diff = [by_prompt["mean"][i] - by_prompt["initial_mean"][i] for i in both]
        out["gain"] = round(sum(diff) / len(diff), 4)
        out["gain_se"] = round(winrate.clustered_se(diff), 4)  # (each prompt its own cluster)
    return out


def compares(judge) -> bool:
    """Whether a judge is asked which of two responses is better (a pairwise model, a
    comparing judge) rather than scoring each."""
    return bool(getattr(judge, "compares", False))


def judge_identities(cfg: Config, paths: Paths) -> dict[str, dict]:
    """What each judge of the evaluation is, by name, beyond its settings: the gold judge and
    the answer check where the prompts have them, and every ``evaluate.judges`` judge (a
    function's source checksum, a model's weights), so editing a judge's function or
    replacing its model redoes the evaluations it made (the run's reward is counted as
    ``reward``)."""
    out = {}
    for role in ("gold", "correct"):
        if judge := rewards.of(cfg, role):
            out[role] = judge.identity()
    for part in cfg.evaluate.judges:
        judge = rewards.of(cfg, "evaluator", run=paths.run, part=part)
        out[rewards.source_name(part)] = judge.identity()
    return out


def _judge_conf(part) -> dict:
    """An ``evaluate.judges`` judge's settings, its function named as in its identity."""
    out = plain(part)
    return out | ({"function": rewards.function_name(part.function)} if part.function else {})


def constrained(cfg: Config, paths: Paths, i: int) -> list:
    """The KL constraint's stage, where the run has one (it chose the policy evaluated)."""
    return [paths.stage(i, "constrain")] if cfg.handoff.constrain else []


def new_policy(cfg: Config, paths: Paths, i: int, policy: str):
    """The policy the update of iteration i made: its starting policy with the LoRA adapter
    on top (not merged), or the update's full model."""
    (trained, adapter), dev = paths.trained_policy(i), models.device(str(cfg.device))
    if adapter:
        return models.load_policy(policy, str(cfg.model.dtype), dev, str(trained))
    return models.load_policy(str(trained), str(cfg.model.dtype), dev)


def stage_for(
    cfg: Config, paths: Paths, i: int, policy: str, reference: str, reward: Reward
) -> Stage:
    """Iteration i's evaluate stage: its identity is the sampling, the policy and the KL's
    reference, the run's reward, the reference responses and every judge's own identity."""
    against, reads = heldout.reference_conf(cfg, paths, i)
    j = heldout.started_from(paths, i)  # the policy it started from: its samples (vs_previous)
    reads += [paths.stage(j, "evaluate")] if j is not None and not reads else []
    conf = {
        **heldout.sample_conf(cfg),
        "policy": policy,
        "reference": reference,
        "reward": reward.identity(),
        **({"win_rate_reference": against} if against else {}),  # (none: the initial samples)
        **({"judges": [_judge_conf(p) for p in js]} if (js := cfg.evaluate.judges) else {}),
        "judge_identity": judge_identities(cfg, paths),
    }
    return Stage(
        paths.stage(i, "evaluate"),
        "evaluate",
        conf,
        inputs=[paths.stage(i, "update"), *constrained(cfg, paths, i), paths.heldout_dir, *reads],
    )


def run_reward(cfg: Config, paths: Paths, rm: str | None) -> Reward:
    """The run's reward as an iteration judges with it: ``rm``, the reward model the
    iteration labelled with (the refreshed one, where the run refreshes; None: the run's
    own, ``paths.reward_model``)."""
    rm = paths.reward_model if rm is None else rm
    return rewards.of(cfg, path=rm, device=models.device(str(cfg.device)), run=paths.run)


def run(
    cfg: Config, paths: Paths, i: int, policy: str, reference: str, rm: str | None = None
) -> dict:
    """Iteration i's evaluation; ``rm``: the reward model the iteration labelled with (the
    refreshed one, where the run refreshes; None: the run's own, ``paths.reward_model``)."""
    reward = run_reward(cfg, paths, rm)
    stage = stage_for(cfg, paths, i, policy, reference, reward)
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
        ref = heldout.reference(cfg, paths, i, samples)
        prev = heldout.previous(paths, i, samples)
        measured, each = scores(cfg, paths, samples, reward, ref, prev)
    write_shard(each, shard_path(paths.evaluation_scores(i), 0))
    kl_info = {
        "k1": _mean(per_seq["k1"]),
        "k1_se": round(winrate.clustered_se(per_seq["k1"], samples["prompt_id"].to_pylist()), 4),
        "k3": _mean(per_seq["k3"]),
        "sequences": len(per_seq["k1"]),
        "reference": reference,
    }
    return stage.finish(
        kl=kl_info,
        rows_out=samples.num_rows,
        dropped=info["dropped"],
        **measured,
        **samplers.summary(samples),
        timings={**info["timings"], **timer.seconds},
    )
