"""Constrain the KL before the handoff: of the policies between the iteration's starting
policy and the update's, θ_α = θ_prev + α (θ_new − θ_prev), the one with the largest α on a
grid (k/64) whose KL to the reference stays under the target, ``handoff.kl_target`` ×
``handoff.max_kl`` (WARP's interpolation towards the initialisation, chosen per iteration).

For a LoRA adapter, θ_α is the adapter with its ``lora_B`` scaled by α: the adapter's
weight change is ``s · B A``, linear in B, so this is exactly the interpolation of the merged
weights (dropout plays no part: the policy is evaluated, not trained). For a whole model,
θ_α is the float32 interpolation of every weight.

The search is cheap and deterministic. The update's policy samples the first
``handoff.constrain_prompts`` held-out prompts once (``constrain/samples_0/``, seeded); on
those fixed responses, KL(θ_α || reference) is the full-vocabulary KL of each response
position, summed per response and averaged (no sampling per α: at α = 1 it is the
sequence KL with less noise than the sampled estimator; below 1 it is measured along the
update's responses, not θ_α's own). α = 1 is tried first (within the target: the update
is kept whole), then 0 (over the target: the starting policy already is, and so is every
θ_α; see below), then ½ and a
quadratic through the three to guess the crossing, then bisection on the grid, so a rerun
picks the same α. Up to two more rounds sample θ_α at the α chosen and search again on
those responses (``settle``): the KL far from the update is overstated along the
update's responses, so a later round may move α up as well as down; the α kept is the
largest whose own samples were within the target, and the upper end of the 95% interval of
their KL (its standard error clustered by prompt) within the budget, ``handoff.max_kl``:
each round searches under the target, or under the KL at which that upper end, as wide
relative to the KL as on its samples, meets the budget where that is lower, and checks
the α it finds on its own samples. With ``handoff.extrapolate``, an update under half the
target is tried further along its direction (``_Search.beyond``, ``worth_it``). The
evaluation that follows samples θ_α afresh and measures its KL with the usual
estimator, which the handoff's gate checks against the budget.

When the starting policy is over the target already (a run whose previous iteration was
accepted between the target and the budget), the search runs again between the initial
policy and the update's, as whole models in float32 (an adapter merged): a step back
towards the initial policy that keeps what the update learnt, not an update judged whole.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from iterate import progress, winrate
from iterate.config import Config
from iterate.stages import evaluate, heldout
from iterate.store.paths import Paths, run_config
from iterate.store.shards import read_json, read_shards, write_folder
from iterate.store.stage import DONE, Stage, counted, resolve
from iterate.train import models

log = logging.getLogger(__name__)

GRID = 64  # α is k / GRID
ROUNDS = 3  # samplings: of the update's policy, then of the α each round gave


@contextmanager
def at_scale(model, start: dict[str, torch.Tensor] | None = None):
    """A function ``set(α)`` that puts ``model`` at θ_α, and on exit back at θ_1: a LoRA
    model's ``lora_B`` weights scaled by α; with ``start`` (θ_0's weights, float32, by
    name), every weight at ``start + α (end - start)``, ``end`` the model's own."""
    names = [n for n, _ in model.named_parameters() if "lora_B" in n] if start is None else start
    params = dict(model.named_parameters())
    end = {n: params[n].detach().float().clone() for n in names}

    def put(alpha: float) -> None:
        with torch.no_grad():
            for n in names:
                lo = 0.0 if start is None else start[n]
                params[n].copy_(lo + alpha * (end[n] - lo))

    try:
        yield put
    finally:
        put(1.0)


@torch.no_grad()
def full_kl(model, ref, tok, prompts: list, responses: list, batch_size: int) -> list[float]:
    """KL(model || ref) per response: the full-vocabulary KL of each response position,
    summed over the response's tokens (``ref`` None: the model with its adapter disabled).
    Each prompt is run once and given no logits (``models.response_logits``)."""
    dev = next(model.parameters()).device
    pad_id = tok.pad_token_id
    out = []
    for b in range(0, len(prompts), batch_size):
        ps, rs = prompts[b : b + batch_size], [responses[b : b + batch_size]]
        if not any(rs[0]):  # no response token to measure
            out += [0.0] * len(ps)
            continue
        logits, _, rmask = models.response_logits(model, pad_id, ps, rs, dev)
        logp = logits.float().log_softmax(-1)
        # (the reference's side is computed again for every α: kept, a batch's log-probs over
        # the whole vocabulary would hold a real model's memory many times over)
        with models.reference_of(model, ref) as r:
            logq = models.response_logits(r, pad_id, ps, rs, dev)[0].float().log_softmax(-1)
        per_token = (logp.exp() * (logp - logq)).sum(-1)  # (B, R)
        out += (per_token * rmask).sum(-1).tolist()
    return out


def mean_kl(model, ref, tok, prompts: list, responses: list, batch_size: int) -> float:
    """The mean over responses of ``full_kl``: what the search compares with the target."""
    each = full_kl(model, ref, tok, prompts, responses, batch_size)
    return sum(each) / len(each)


def search(
    kl_at: Callable[[float], float], target: float, over: int | None = None, tried=None
) -> tuple[float, str, dict]:
    """The largest α = k / GRID with ``kl_at(α) <= target``, KL rising with α; the decision
    (``whole``, ``constrained``, or ``start over target``) and every α tried with its KL
    (``tried``: those known already, not measured again). ``over``: the smallest k whose α
    is known to be over the target (an earlier round's, on its own samples): the search is
    then below it, α = 1 not tried first."""
    tried = dict(tried or {})

    def kl(k: int) -> float:
        a = k / GRID
        if a not in tried:
            tried[a] = kl_at(a)
        return tried[a]

    if over is None and kl(GRID) <= target:
        return 1.0, "whole", tried
    if kl(0) > target:
        return 1.0, "start over target", tried
    top = GRID if over is None else over
    lo, hi, half = 0, top, top // 2  # kl(lo) <= target, hi known over
    if 0 < half < top:
        lo, hi = (half, hi) if kl(half) <= target else (lo, half)
        # a quadratic through 0, top / 2 and top guesses where it crosses the target
        t, y0, yh, y1 = top / GRID, kl(0), kl(half), kl(top)
        a2 = 2 * (y1 - 2 * yh + y0) / t**2  # y = a2 α² + a1 α + y0
        a1 = (4 * yh - y1 - 3 * y0) / t
        if guess := [r for r in _roots(a2, a1, y0 - target) if lo / GRID < r < hi / GRID]:
            k = min(max(round(guess[0] * GRID), lo + 1), hi - 1)
            if lo < k < hi:
                lo, hi = (k, hi) if kl(k) <= target else (lo, k)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if kl(mid) <= target else (lo, mid)
    return lo / GRID, "constrained", tried


def settle(
    along: Callable[[int, float], tuple[Callable[[float], float], float]],
    target: float,
    budget: float = math.inf,
    rounds: int = ROUNDS,
    first: float = 1.0,
) -> tuple[float, list[dict]]:
    """α and the rounds' records. ``along(r, α)`` samples θ_α (round r's seed) and gives the
    KL at any α along those responses, and the upper end of the 95% interval of θ_α's KL on
    them. Each round samples at the α the round before chose (the first at ``first``: α = 1,
    the update's policy) and searches again on its responses: the KL at the sampled α is
    then its own (on-policy), and one over the target, or whose upper end is over
    ``budget``, bounds every later search from above; the next α may lie above the sampled
    one or below. A round searches under the target, or lower where its interval is wide:
    under the KL at which the upper end, as wide relative to the KL as on its samples, meets
    the budget (an interval's width grows with the KL): it shrinks α by what the estimate's
    noise asks. The rounds stop when a round keeps its α (or even α = 0 is over the target);
    the α kept is the largest whose own samples were within (the KL under the target, its
    upper end under the budget), else the last chosen (the evaluation's KL and the gate
    then judge it)."""
    alpha, over, out, within = first, None, [], []
    for r in range(rounds):
        kl_at, upper = along(r, alpha)
        own = kl_at(alpha)  # θ_α's KL on its own samples
        # the KL at which the upper end, as wide relative to it as here, meets the budget
        limit = min(target, own * budget / upper) if own > 0 and upper > 0 else target
        if own <= target and upper <= budget:
            within.append(alpha)
        else:
            over = min(GRID if over is None else over, round(alpha * GRID))
        chosen, decision, tried = search(kl_at, limit, over, {alpha: own})
        out.append(
            {
                "sampled_at": alpha,
                "alpha": chosen,
                "decision": decision,
                "own_kl": round(own, 6),
                "own_upper": round(upper, 6),
                "limit": round(limit, 6),
                "tried": [{"alpha": a, "kl": round(k, 6)} for a, k in sorted(tried.items())],
            }
        )
        said = ", ".join(f"{a:.3g}: {k:.3g}" for a, k in sorted(tried.items()))
        log.info(
            "constrain: KL under %.3g, on samples at α %.4g (their KL %.3g, upper end "
            "%.3g): α %.4g (%s; tried %s)",
            limit,
            alpha,
            own,
            upper,
            chosen,
            decision,
            said,
        )
        if decision == "start over target" or chosen == alpha:
            break
        alpha = chosen
    return max(within, default=alpha), out


def _shifted(record: dict) -> dict:
    """A round's record of the search past the update, its αs as 1 + x."""
    tried = [{**t, "alpha": 1 + t["alpha"]} for t in record["tried"]]
    return {
        **record,
        "sampled_at": 1 + record["sampled_at"],
        "alpha": 1 + record["alpha"],
        "tried": tried,
    }


def worth_it(new: list, new_table, old: list, old_table) -> dict:
    """Whether the run's reward prefers the extrapolated policy's samples (``new``: their
    rewards) to the update's (``old``): its mean reward higher by more than two standard
    errors of the gain paired by prompt (``evaluate.means``), and its length-controlled win
    rate against them, pair by pair (same prompt, same sample number), at least one half
    (a gain bought with length alone is not taken); where that rate cannot be fitted (one
    side wins every pair), the raw win rate, if the new samples are no longer on average."""
    gain = evaluate.means(new, new_table, old, old_table)
    rows = heldout.aligned(new_table, old_table)
    new_len = [len(r) for r in new_table["response"].to_pylist()]
    old_len = [len(r) for r in old_table["response"].to_pylist()]
    ids = new_table["prompt_id"].to_pylist()
    pairs = [
        (winrate.preference(new[j], old[k]), new_len[j], old_len[k], ids[j])
        for j, k in enumerate(rows)
        if k is not None and evaluate.is_score(new[j]) and evaluate.is_score(old[k])
    ]
    figs = winrate.figures(*map(list, zip(*pairs))) if pairs else {}
    _, lengths, their, prompts = map(list, zip(*pairs)) if pairs else ([], [], [], [])
    out = {
        "gain": gain.get("gain"),
        "gain_se": gain.get("gain_se"),
        "lc_win_rate": figs.get("lc_win_rate"),
        "win_rate": figs.get("win_rate"),
        "length_ratio": round(sum(lengths) / max(sum(their), 1), 4),
        "prompts": len(set(prompts)),
    }
    if out["prompts"] < 2:  # one prompt gives no spread between prompts: no standard error
        return {**out, "kept": False, "why": "fewer than 2 prompts scored on both sides"}
    rises = out["gain"] is not None and out["gain"] > 2 * (out["gain_se"] or 0)
    if out["lc_win_rate"] is not None:
        fair, said = out["lc_win_rate"] >= 0.5, "its LC win rate under 1/2"
    else:  # not fitted (one side wins every pair): the raw rate, where no longer on average
        fair = (out["win_rate"] or 0) >= 0.5 and out["length_ratio"] <= 1
        said = "its win rate under 1/2 or its answers longer (the LC rate not fitted)"
    out["kept"] = rises and fair
    if not out["kept"]:
        out["why"] = "the reward does not rise by 2 se" if not rises else said
    return out


def _roots(a: float, b: float, c: float) -> list[float]:
    if abs(a) < 1e-12:
        return [-c / b] if abs(b) > 1e-12 else []
    d = b * b - 4 * a * c
    if d < 0:
        return []
    return sorted(((-b - math.sqrt(d)) / (2 * a), (-b + math.sqrt(d)) / (2 * a)))


def stage_for(cfg: Config, paths: Paths, i: int, policy: str, reference: str, reward=None) -> Stage:
    """Iteration i's constrain stage: its handoff settings, the sampling, the policy and the
    KL's reference, and with ``handoff.extrapolate`` the run's reward that judges it."""
    conf = {
        "handoff": {k: v for k, v in counted(cfg, "handoff").items() if k in KEYS},
        **heldout.sample_conf(cfg),
        "policy": policy,
        "reference": reference,
        **({"reward": reward.identity()} if reward is not None else {}),
    }
    return Stage(
        paths.stage(i, "constrain"),
        "constrain",
        conf,
        inputs=[paths.stage(i, "update"), paths.heldout_dir],
    )


KEYS = ("max_kl", "kl_target", "constrain_prompts", "extrapolate")  # the handoff settings it reads


def _ends(paths: Paths, i: int, policy: str, reference: str, dev) -> tuple:
    """(the update's policy in float32, its start's weights by name (None for a LoRA
    adapter: scaled from zero), the KL's reference model (None: the adapter disabled), whether
    the update trained an adapter)."""
    adapter = paths.update_output(i, True).exists()
    trained = paths.update_output(i, adapter)
    ref = None  # the reference: the adapter disabled, or the starting policy's model
    if adapter:
        model, start = models.load_policy(policy, "float32", dev, str(trained)), None
    else:
        model = models.load_policy(str(trained), "float32", dev)
        ref = models.load_policy(policy, "float32", dev)
        before = dict(ref.named_parameters())
        start = {n: before[n].detach() for n, _ in model.named_parameters()}
    if reference != policy:
        ref = models.load_policy(reference, "float32", dev)
    return model, start, ref, adapter


@dataclass
class _Search:
    """What an iteration's search holds fixed: where it samples and saves, the tokenizer,
    the held-out prompts it samples, the KL's reference model (None: the adapter disabled),
    the target and the stage's timer."""

    cfg: Config
    paths: Paths
    i: int
    folder: Path
    tok: Any
    held: Any
    policy: str
    ref: Any
    target: float
    timer: progress.Timer

    def sample(self, model, r: int, name: str = "samples") -> tuple[list, list, list]:
        """Round r's seeded samples of ``model`` as it stands, in ``<name>_<r>/``: (prompt ids,
        response ids, each sample's held-out prompt)."""
        with self.timer("sample_s"):
            put = lambda sampler: sampler.sync(model, self.tok, self.policy)  # noqa: E731
            seed = 1000 * (self.i + 1) + r + (0 if name == "samples" else 100)
            samples, _ = heldout.sample(
                self.cfg,
                self.tok,
                self.held,
                self.folder / f"{name}_{r}",
                seed,
                put,
                (self.i, "constrain"),
            )
        return self.ids(samples)

    def ids(self, samples) -> tuple[list, list, list]:
        """A samples table as the KL passes read it: (prompt ids, response ids, each
        sample's held-out prompt)."""
        prompts = [models.prompt_ids(self.tok, p) for p in samples["prompt"].to_pylist()]
        return prompts, samples["response_ids"].to_pylist(), samples["prompt_id"].to_pylist()

    def measure(self, model, put, at: float, samples: tuple) -> tuple[Callable, float]:
        """What a round of ``settle`` asks of its samples (prompt ids, response ids, their
        prompts), the model put at ``at`` (``put``): the KL at any point along them, and
        the upper end of the 95% interval of the KL at ``at`` (clustered by prompt)."""
        prompts, responses, clusters = samples
        batch = self.cfg.evaluate.batch_size
        with self.timer("search_s"):
            own = full_kl(model, self.ref, self.tok, prompts, responses, batch)
        mean = sum(own) / len(own)
        upper = mean + 1.96 * winrate.clustered_se(own, clusters)

        def kl_at(a: float) -> float:
            if a == at:
                return mean
            with self.timer("search_s"):
                put(a)
                return mean_kl(model, self.ref, self.tok, prompts, responses, batch)

        return kl_at, upper

    def between(self, model, start) -> tuple[float, list[dict], int]:
        """(α, the rounds, the responses measured) between ``start`` (None: the adapter's
        zero) and ``model`` (``settle``); a policy at α < 1 saved
        (``Paths.constrained_policy``)."""
        with at_scale(model, start) as put_alpha:
            measured = 0

            def along(r: int, alpha: float) -> tuple[Callable[[float], float], float]:
                nonlocal measured
                put_alpha(alpha)
                prompts, responses, clusters = self.sample(model, r)
                measured = len(responses)
                return self.measure(model, put_alpha, alpha, (prompts, responses, clusters))

            alpha, rounds = settle(along, self.target, self.cfg.handoff.max_kl)
            if alpha < 1:
                put_alpha(alpha)
                self.save(model, whole=start is not None)
        return alpha, rounds, measured

    def beyond(self, model, start, reward) -> dict:
        """Past the update (``handoff.extrapolate``): θ_{1+x} for x in (0, 1], searched as
        below 1 (``settle``, its first round on the update's own samples, round 0's, its
        later ones on samples of the x each chose, ``beyond_<r>/``): the largest x whose own
        samples were within the target (their interval's upper end within the budget); kept
        (saved as the constrained policy) when ``worth_it`` says the run's reward prefers its
        samples to the update's. The record, its α = 1 + x."""
        folders, one = {}, read_shards(self.folder / "samples_0")  # (the update's samples)
        with at_scale(model, start) as put_alpha:

            def along(r: int, x: float) -> tuple[Callable[[float], float], float]:
                put_alpha(1 + x)
                if r == 0:  # the update's own samples: the search below 1 drew them
                    prompts, responses, clusters = self.ids(one)
                    folders[x] = "samples_0"
                else:
                    prompts, responses, clusters = self.sample(model, r, "beyond")
                    folders[x] = f"beyond_{r}"
                shifted = lambda a: put_alpha(1 + a)  # noqa: E731  (x measured as α = 1 + x)
                return self.measure(model, shifted, x, (prompts, responses, clusters))

            x, rounds = settle(along, self.target, self.cfg.handoff.max_kl, first=0.0)
            out = {"alpha": 1 + x, "rounds": [_shifted(r) for r in rounds]}
            if x == 0:
                return {
                    **out,
                    "kept": False,
                    "why": "no α past 1 within the KL target on its own samples",
                }
            ext = read_shards(self.folder / folders[x])
            with self.timer("score_s"):
                scored, _ = evaluate.reward_scores(self.cfg, reward, {"ext": ext, "one": one})
            out.update(worth_it(scored["ext"], ext, scored["one"], one))
            if out["kept"]:
                put_alpha(1 + x)
                self.save(model, whole=start is not None)
        return out

    def save(self, model, whole: bool) -> None:
        """The chosen policy into ``constrain/``: the scaled adapter, or the whole model in
        the policy's dtype."""
        with self.timer("save_s"):
            if whole:
                model.to(models.DTYPES[str(self.cfg.model.dtype)])
            save = lambda tmp: (model.save_pretrained(tmp), self.tok.save_pretrained(tmp))  # noqa: E731
            write_folder(self.paths.constrained_policy(self.i, not whole), save)


def run(
    cfg: Config, paths: Paths, i: int, policy: str, reference: str, rm: str | None = None
) -> dict:
    """Iteration i's constrained policy: α and, other than 1, its adapter or model in
    ``constrain/`` (``Paths.trained_policy`` then gives it to the evaluation and the
    handoff). The search runs on the update's samples, then on samples of each α it chose
    (the KL along θ_α's own responses, not the update's): ``_Search.between``; with
    ``handoff.extrapolate``, past the update when it is under half the target
    (``_Search.beyond``, judged by the run's reward: ``rm`` as in the evaluation)."""
    hc = cfg.handoff
    reward = evaluate.run_reward(cfg, paths, rm) if hc.extrapolate else None
    stage = stage_for(cfg, paths, i, policy, reference, reward)
    if stage.check(cfg.force):
        return stage.read_done()
    timer = progress.Timer()
    dev = models.device(str(cfg.device))
    tok = models.load_tokenizer(policy, cfg.model.chat_template)
    with timer("load_s"):
        model, start, ref, adapter = _ends(paths, i, policy, reference, dev)
    held = read_shards(paths.heldout_dir).slice(0, hc.constrain_prompts)
    target = hc.kl_target * hc.max_kl
    searched = _Search(cfg, paths, i, stage.path, tok, held, policy, ref, target, timer)
    alpha, rounds, n = searched.between(model, start)
    towards = None
    if rounds[0]["decision"] == "start over target" and policy != paths.base_policy:
        # the starting policy is over the target already: interpolate towards the initial
        # policy instead, from the update's policy as a whole model (an adapter merged)
        log.info(
            "constrain: the starting policy is over the KL target: towards the initial "
            "policy instead"
        )
        with timer("load_s"):
            whole = model.merge_and_unload() if adapter else model
            initial = dict(models.load_policy(paths.base_policy, "float32", dev).named_parameters())
            first = {n: initial[n].detach() for n, _ in whole.named_parameters()}
        alpha, more, n = searched.between(whole, first)
        towards = "initial"
        rounds += [{**r, "towards": "initial"} for r in more]
    decision = rounds[-1]["decision"] if alpha == 1 else "constrained"
    beyond = None
    under = decision == "whole" and towards is None and rounds[-1]["own_kl"] < target / 2
    if reward is not None and under:  # (not after a step back: the adapter is merged there)
        if evaluate.compares(reward):
            beyond = {"kept": False, "why": "a comparing reward gives no scores to add up"}
        else:
            beyond = searched.beyond(model, start, reward)
        if beyond["kept"]:
            alpha, decision = beyond["alpha"], "extrapolated"
        log.info(
            "constrain: past the update (KL %.3g < half the target): %s",
            rounds[-1]["own_kl"],
            beyond,
        )
    return stage.finish(
        alpha=alpha,
        decision=decision + (" towards the initial policy" if towards and alpha < 1 else ""),
        target=target,
        rounds=rounds,
        **({"beyond": beyond} if beyond is not None else {}),
        sequences=n,
        timings=timer.seconds,
    )


def kl_grid(run: Path, i: int, points: int = 5) -> list[tuple[float, float]]:
    """KL(θ_α || reference) of a finished run's iteration ``i`` at ``points`` evenly spaced
    α from 0 to 1, on the constraint's first samples (the update's policy's), measured as
    the search measures it: how the KL rises along the interpolation."""
    from omegaconf import OmegaConf

    from iterate.config import to_dataclass

    cfg = to_dataclass(OmegaConf.create(run_config(run)))
    paths = Paths(run=Path(run), base_policy="")
    conf = resolve(read_json(paths.stage(i, "constrain") / DONE)["config"], Path(run))
    policy, reference = conf["policy"], conf["reference"]
    tok = models.load_tokenizer(policy, cfg.model.chat_template)
    model, start, ref, _ = _ends(paths, i, policy, reference, models.device(str(cfg.device)))
    samples = read_shards(paths.stage(i, "constrain") / "samples_0")
    prompts = [models.prompt_ids(tok, p) for p in samples["prompt"].to_pylist()]
    responses = samples["response_ids"].to_pylist()
    out = []
    with at_scale(model, start) as put_alpha:
        for k in range(points):
            put_alpha(a := k / (points - 1))
            out.append((a, mean_kl(model, ref, tok, prompts, responses, cfg.evaluate.batch_size)))
    return out


if __name__ == "__main__":  # python -m iterate.stages.constrain RUN ITERATION [POINTS]
    import sys

    points = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    for a, k in kl_grid(Path(sys.argv[1]), int(sys.argv[2]), points):
        print(f"alpha {a:.3f}  KL {k:.4f}")
