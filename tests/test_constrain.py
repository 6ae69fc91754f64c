"""The KL constraint before the handoff (``iterate.stages.constrain``): the α search on the
grid, a LoRA adapter at scale α as the merged interpolation, a whole model's interpolation,
the full-vocabulary KL by hand, and a run whose updates overshoot the target handing on the
scaled policy."""

import json
import math

import pytest
import torch

from iterate.run import loop
from iterate.stages import constrain
from iterate.train import models

from .conftest import compose_cfg


def test_the_search_finds_the_largest_alpha_on_the_grid_under_the_target():
    """A KL rising with α: the largest k/64 at or under the target, found in a few
    evaluations (ends, half, a quadratic guess, bisection) and the same on a rerun; α = 1
    when the whole update is within the target; 1 with ``start over target`` when even α = 0
    is over (nothing to gain); below ``over`` when an earlier round found it over, α = 1
    then not tried; KLs known already not measured again."""
    calls = []

    def kl(a: float) -> float:
        calls.append(a)
        return 3 * a**2 + 0.5 * a

    alpha, decision, tried = constrain.search(kl, 1.0)
    best = max(k for k in range(65) if kl(k / 64) <= 1.0) / 64
    calls.clear()
    assert (alpha, decision) == (best, "constrained") and 0 < alpha < 1
    assert all(k <= 1.0 for a, k in tried.items() if a <= alpha)
    assert min(k for a, k in tried.items() if a > alpha) > 1.0
    assert len(tried) <= 8 and constrain.search(kl, 1.0)[:2] == (alpha, decision)
    assert constrain.search(kl, 5.0)[:2] == (1.0, "whole")
    assert constrain.search(lambda a: 2.0 + a, 1.0)[:2] == (1.0, "start over target")
    under = constrain.search(lambda a: a, 0.9, over=32)  # 0.5 was over in an earlier round
    assert under[0] == 31 / 64 and 1.0 not in under[2]
    calls.clear()
    again = constrain.search(kl, 1.0, tried={1.0: kl(1.0), 0.0: 0.0})
    assert again[:2] == (alpha, decision) and 0.0 not in calls[1:] and 1.0 not in calls[1:]


def test_later_rounds_may_move_alpha_up_and_keep_the_largest_within_on_its_own_samples():
    """KL along the samples of θ_s overstates the KL of a policy far from s (here by
    1 + 2 (α − s)²; its own KL at α = s is the true one, 8α²). Round 0, on the update's
    samples, stops short of the true crossing; round 1, on θ_α's own, moves α up to within a
    grid step of it; round 2 keeps it. What each round's samples said over the target bounds
    the later rounds, and with the rounds spent the α kept is the largest that was within on
    its own samples."""
    from iterate.stages.constrain import GRID, settle

    sampled = []

    def along(r: int, s: float):
        sampled.append(s)
        return (lambda a: 8 * a**2 * (1 + 2 * (a - s) ** 2)), 8 * s**2  # no noise: upper = own

    alpha, rounds = settle(along, 2.0)
    true = max(k for k in range(GRID + 1) if 8 * (k / GRID) ** 2 <= 2.0) / GRID
    assert sampled[0] == 1.0 and rounds[0]["alpha"] < rounds[1]["alpha"], "moved up"
    assert true - 1 / GRID <= alpha < true and [r["sampled_at"] for r in rounds] == sampled
    assert len(rounds) == 3 and rounds[2]["alpha"] == rounds[2]["sampled_at"] == alpha
    assert rounds[-1]["own_kl"] <= 2.0 and rounds[0]["own_kl"] == 8.0
    # one round only: the update's samples' α, never checked on its own: kept as the guess
    first, _ = settle(along, 2.0, rounds=1)
    assert first == rounds[0]["alpha"] < true
    # a policy whose own samples say it is over: later rounds stay below it; rounds spent,
    # the largest α within on its own samples is kept, not the last guess
    own = {}

    def noisy(r: int, s: float):
        own[s] = 8 * s**2 * (1.5 if r == 1 else 1.0)  # round 1's sample: over, by chance
        return (lambda a: own[s] if a == s else 8 * a**2), own[s]

    alpha, rounds = settle(noisy, 2.0)
    assert rounds[1]["own_kl"] > 2.0 and rounds[2]["sampled_at"] < rounds[1]["sampled_at"]
    assert all(t["alpha"] <= rounds[1]["sampled_at"] for t in rounds[2]["tried"])
    assert rounds[2]["alpha"] < rounds[1]["sampled_at"]
    assert alpha == max(s for s, k in own.items() if k <= 2.0)


def test_the_search_past_the_update_starts_on_its_samples_and_keeps_what_its_own_allow():
    """``settle(first=0)``, as the extrapolation uses it (x: how far past the update, θ_{1+x}):
    the true KL is 2 + 8x², and along the samples of θ_{1+s} a policy further out looks
    smaller by (1 − 0.3 (a − s)²). Round 0 is on the update's own samples (x = 0) and looks
    as far as x = 1; round 1, sampled there, finds it over the target 8 and searches below;
    the x kept is the largest whose own samples were within, past 0, within a grid step
    of the true crossing (8x² = 6)."""
    from iterate.stages.constrain import GRID, settle

    sampled = []

    def along(r: int, s: float):
        sampled.append(s)
        return (lambda a: (2 + 8 * a**2) * (1 - 0.3 * (a - s) ** 2)), 2 + 8 * s**2

    x, rounds = settle(along, 8.0, first=0.0)
    true = max(k for k in range(GRID + 1) if 2 + 8 * (k / GRID) ** 2 <= 8.0) / GRID
    assert sampled[0] == 0.0 and rounds[0]["decision"] == "whole" and sampled[1] == 1.0
    assert rounds[1]["own_kl"] > 8.0 and true - 1 / GRID <= x <= true
    assert x == max(r["sampled_at"] for r in rounds if r["own_kl"] <= 8.0) > 0


def test_a_round_whose_kl_interval_reaches_past_the_budget_shrinks_alpha():
    """The KL at α is 8α² on every round's samples, the target 2 (α = 1/2) and the budget
    2.5. With the upper end of its interval 1.5 times the estimate (the update's own
    samples, at α = 1, without noise) the estimate at 1/2 is within the target but its upper
    end, 3, is over the budget: the next round searches under 2 × 2.5 / 3 (where the upper
    end would meet the budget) and its α (the largest k/64 with 8α² under that) is within
    on both counts, and kept: the last round searches under the same and keeps it. Without
    the noise, or with no budget given, α = 1/2 stands after two rounds."""
    from iterate.stages.constrain import GRID, settle

    def along(ratio: float):
        return lambda r, s: ((lambda a: 8 * a**2), 8 * s**2 * (ratio if s < 1 else 1))

    alpha, rounds = settle(along(1.5), 2.0, budget=2.5)
    shrunk = max(k for k in range(GRID + 1) if 8 * (k / GRID) ** 2 <= 2 * 2.5 / 3) / GRID
    assert [r["sampled_at"] for r in rounds] == [1.0, 0.5, shrunk] and alpha == shrunk
    assert rounds[1]["own_upper"] == 3.0 and rounds[1]["limit"] == round(2 * 2.5 / 3, 6)
    assert rounds[-1]["own_upper"] <= 2.5 and rounds[-1]["alpha"] == shrunk
    for quiet in (settle(along(1.0), 2.0, budget=2.5), settle(along(1.5), 2.0)):
        assert quiet[0] == 0.5 and len(quiet[1]) == 2
    # an update that barely moved: its KL a rounding error below 0, the interval's upper end
    # just above: whole, not a negative limit that even the starting policy would be over
    still = lambda r, s: ((lambda a: 0.0 if a == 0 else -1e-7), 2e-7)  # noqa: E731
    for budget in (10.0, math.inf):
        alpha, rounds = settle(still, 8.0, budget=budget)
        assert alpha == 1.0 and rounds[0]["decision"] == "whole" and rounds[0]["limit"] == 8.0


def test_an_extrapolation_is_kept_only_when_the_reward_rises_by_two_errors_at_equal_length():
    """``worth_it`` by hand: 4 prompts × 2 samples, each extrapolated sample against the
    update's of the same prompt and number. Rewards higher in every pair, responses of
    equal length: the paired gain (per prompt, then averaged) is far over two standard
    errors; every pair won leaves the length-controlled rate unfitted, and the raw rate
    decides at equal length (at twice the length it does not). One pair lost: the fitted
    rate, 7/8, decides. Noise around 0: not kept, the reason said."""
    import pyarrow as pa

    from iterate.stages.constrain import worth_it

    def table(responses: list[str]) -> pa.Table:
        ids = [f"p{j // 2}" for j in range(8)]
        return pa.table(
            {"prompt_id": ids, "sample_idx": [j % 2 for j in range(8)], "response": responses}
        )

    one, ext = table(["abcd"] * 8), table(["wxyz"] * 8)
    old = [0.1, 0.3, 0.2, 0.0, 0.5, 0.4, 0.2, 0.1]
    new = [x + 1 for x in old[:-1]] + [old[-1] + 0.8]
    got = worth_it(new, ext, old, one)
    per_prompt = [(new[2 * k] + new[2 * k + 1] - old[2 * k] - old[2 * k + 1]) / 2 for k in range(4)]
    assert got["gain"] == pytest.approx(sum(per_prompt) / 4, abs=1e-4)
    assert got["gain"] > 2 * got["gain_se"] and got["lc_win_rate"] is None and got["kept"]
    assert got["length_ratio"] == 1.0  # (every pair won: no fit; the raw rate at equal length)
    longer = worth_it(new, table(["wxyz" * 2] * 8), old, one)
    assert not longer["kept"] and "answers longer" in longer["why"]
    mixed = [*new[:-1], old[-1] - 0.2]  # one pair lost: the length-controlled rate is fitted
    got = worth_it(mixed, ext, old, one)
    assert got["lc_win_rate"] == pytest.approx(7 / 8) and got["kept"]
    flat = worth_it([x + (0.05 if j % 2 else -0.05) for j, x in enumerate(old)], ext, old, one)
    assert not flat["kept"] and flat["why"] == "the reward does not rise by 2 se"


@pytest.mark.slow
def test_an_update_far_under_the_target_is_tried_past_itself(tiny_cache, tiny_rm, tmp_path):
    """With ``handoff.extrapolate`` and a budget the update uses a sliver of, the constraint
    searches α in (1, 2] from the update's samples on (rounds as below 1), samples what it
    found, scores both with the run's reward and records why it kept it or not; a kept one
    is what the evaluation judges (its α over 1 in the row and the card)."""
    base = [
        "experiment=toy_tiny",
        "generate=transformers",
        "iteration=1",
        "update.lr=5e-3",
        "handoff.max_kl=1000",
        "handoff.extrapolate=true",
        "reward.train=false",
        f"reward.path={tiny_rm}",
        f"runs_dir={tmp_path}",
        f"toy.cache_dir={tiny_cache}",
    ]
    [row] = loop.run(compose_cfg(base), tmp_path / "far")
    done = json.loads((tmp_path / "far" / "iter_000" / "constrain" / "_DONE.json").read_text())
    beyond = done["beyond"]
    assert done["rounds"][0]["decision"] == "whole" and done["rounds"][0]["own_kl"] < 400
    assert beyond["rounds"][0]["sampled_at"] == 1  # the first round: the update's samples
    past = [t["alpha"] for r in beyond["rounds"] for t in r["tried"] if t["alpha"] != 1]
    assert past and all(1 < a <= 2 for a in past)  # (α = 1: the update's own KL, known)
    assert isinstance(beyond["kept"], bool) and (beyond["kept"] or beyond["why"])
    if beyond["kept"]:
        assert done["decision"] == "extrapolated" and done["alpha"] == beyond["alpha"] > 1
        assert row["alpha"] == done["alpha"] and row["constrain"] == "extrapolated"
        card = (tmp_path / "far" / "iter_000" / "handoff" / "policy" / "README.md").read_text()
        assert "times its way from the starting policy (extrapolated" in card
    else:
        assert done["alpha"] == 1 and done["decision"] == "whole"
    judged = {"gain", "gain_se", "lc_win_rate"} <= set(beyond)
    assert judged or "KL" in beyond["why"]  # judged by the reward, or stopped by the KL


def _trained_adapter(cfg, world, which: str):
    """The tiny policy with a LoRA adapter whose ``which`` weights are random (as if
    trained: the fresh adapter's B is 0), in eval mode (no dropout)."""
    from iterate.stages.update import common

    model = common.policy_model(cfg, str(world), torch.device("cpu"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if which in n:
                p.normal_(0, 0.05)
    return model.eval()


def test_a_lora_adapter_at_scale_alpha_is_the_merged_interpolation(tiny_cfg, tiny_world):
    """Scaling the adapter's lora_B by α gives the weights θ_prev + α (θ_new − θ_prev) of the
    merged models, to 1e-5; on exit the adapter is whole again. A whole model's
    interpolation puts every weight there."""
    model = _trained_adapter(tiny_cfg, tiny_world, "lora_")

    def merged() -> dict:
        w = {}
        for name, module in model.named_modules():
            if hasattr(module, "get_delta_weight"):
                w[name] = module.base_layer.weight + module.get_delta_weight("default")
        return {k: v.detach().clone() for k, v in w.items()}

    whole = merged()
    with model.disable_adapter():
        prev = {
            n: m.base_layer.weight.detach().clone()
            for n, m in model.named_modules()
            if hasattr(m, "get_delta_weight")
        }
    ids = torch.tensor([[1, 5, 9, 12, 7]])
    before = model(input_ids=ids).logits
    with constrain.at_scale(model) as put:
        for alpha in (0.0, 0.3, 1.0):
            put(alpha)
            now = merged()
            for k in now:
                want = prev[k] + alpha * (whole[k] - prev[k])
                assert torch.allclose(now[k], want, atol=1e-5), (k, alpha)
        put(0.0)
        with model.disable_adapter():
            assert torch.allclose(
                model(input_ids=ids).logits, model.base_model(input_ids=ids).logits
            )
    assert torch.allclose(model(input_ids=ids).logits, before)
    plain = models.load_policy(str(tiny_world))
    start = {n: p.detach().clone() * 0.5 for n, p in plain.named_parameters()}
    end = {n: p.detach().clone() for n, p in plain.named_parameters()}
    with constrain.at_scale(plain, start) as put:
        put(0.25)
        for n, p in plain.named_parameters():
            assert torch.allclose(p, start[n] + 0.25 * (end[n] - start[n]))


def test_the_full_vocabulary_kl_by_hand(tiny_cfg, tiny_world):
    """Per response: the sum over its positions of sum_v p(v) (log p(v) - log q(v)), p the
    policy's next-token distribution and q the reference's given the same prefix; 0 for
    the policy against itself."""
    model = _trained_adapter(tiny_cfg, tiny_world, "lora_B")
    tok = models.load_tokenizer(str(tiny_world))
    prompts = [models.prompt_ids(tok, "Greet Anna."), models.prompt_ids(tok, "Name 2 fruits.")]
    responses = [[40, 41, 42], [50, 51]]
    got = constrain.full_kl(model, None, tok, prompts, responses, 1)
    for (p, r), k in zip(zip(prompts, responses), got):
        ids = torch.tensor([p + r])
        with torch.no_grad():
            logp = model(input_ids=ids).logits[0].log_softmax(-1)
            with model.disable_adapter():
                logq = model(input_ids=ids).logits[0].log_softmax(-1)
        at = range(len(p) - 1, len(p) + len(r) - 1)  # the positions that predict the response
        want = sum(float((logp[t].exp() * (logp[t] - logq[t])).sum()) for t in at)
        # (the prompt's keys and values are cached under the response, not run whole: the
        # same sums to float32's rounding, which a KL of 0.005 sees in its fourth digit)
        assert k == pytest.approx(want, rel=1e-3) and k > 0
    batched = constrain.full_kl(model, None, tok, prompts, responses, 2)  # padded together
    assert batched == pytest.approx(got, rel=1e-3)
    assert constrain.full_kl(model, model, tok, prompts, responses, 2) == pytest.approx([0, 0])


@pytest.mark.slow
def test_an_update_over_the_target_is_handed_on_scaled(tiny_cache, tiny_rm, tmp_path):
    """A DPO update far over a small KL budget: the constraint picks α < 1 on rounds of
    samples, writes the scaled adapter, and the evaluation and the handoff use it (its KL is
    the one measured, and it is accepted); α is in the metrics row and the table. With
    ``handoff.constrain=false`` the run has no such stage."""
    from iterate.report import metrics
    from iterate.stages.plan import run_stages

    base = [
        "experiment=toy_tiny",
        "generate=transformers",
        "iteration=1",
        "update.lr=5e-3",
        "handoff.max_kl=0.05",
        "reward.train=false",
        f"reward.path={tiny_rm}",
        f"runs_dir={tmp_path}",
        f"toy.cache_dir={tiny_cache}",
    ]
    [row] = loop.run(compose_cfg(base), tmp_path / "on")
    run = tmp_path / "on" / "iter_000"
    done = json.loads((run / "constrain" / "_DONE.json").read_text())
    assert done["decision"] == "constrained" and 0 < done["alpha"] < 1
    assert done["alpha"] * 64 == int(done["alpha"] * 64) and 1 <= len(done["rounds"]) <= 3
    first = done["rounds"][0]["tried"]
    assert first[-1]["alpha"] == 1 and first[-1]["kl"] > done["target"] == pytest.approx(0.04)
    assert (run / "constrain" / "adapter" / "adapter_config.json").exists()
    evaluated = json.loads((run / "evaluate" / "_DONE.json").read_text())
    assert "constrain" in json.dumps(evaluated["config"]["inputs"])  # it judged that policy
    assert row["alpha"] == done["alpha"] and row["constrain"] == "constrained"
    assert row["accepted"] and " α " in metrics.table([row])
    card = (run / "handoff" / "policy" / "README.md").read_text()
    assert f"the update taken at α={done['alpha']:.4g} of its way" in card
    assert math.isfinite(row["kl_to_reference"])
    assert "constrain" not in run_stages(compose_cfg([*base, "handoff.constrain=false"]))[1]
    grid = constrain.kl_grid(tmp_path / "on", 0, 3)  # the measuring tool: the search's KLs
    assert [a for a, _ in grid] == [0, 0.5, 1] and grid[0][1] == pytest.approx(0, abs=1e-6)
    assert grid[2][1] == pytest.approx(first[-1]["kl"], rel=1e-4) and grid[1][1] < grid[2][1]
    # a starting policy over the target already (here the update's own, merged): the search
    # steps back towards the initial policy instead, a whole model within the target
    import shutil

    from iterate.store.paths import Paths

    cfg = compose_cfg(base)
    fell = tmp_path / "fell"
    shutil.copytree(tmp_path / "on", fell, ignore=shutil.ignore_patterns("constrain"))
    paths = Paths(run=fell, base_policy=evaluated["config"]["reference"])  # the initial policy
    over = tmp_path / "over"
    merged = models.load_policy(
        paths.base_policy, "float32", torch.device("cpu"), str(run / "update" / "adapter")
    ).merge_and_unload()
    merged.save_pretrained(over)
    models.load_tokenizer(paths.base_policy).save_pretrained(over)
    back = constrain.run(cfg, paths, 0, str(over), paths.base_policy)
    assert back["decision"] == "constrained towards the initial policy" and back["alpha"] < 1
    steps = [r for r in back["rounds"] if r.get("towards") == "initial"]
    assert steps and steps[0]["tried"][0] == {"alpha": 0.0, "kl": 0.0}  # the initial policy
    assert paths.trained_policy(0) == (fell / "iter_000" / "constrain" / "model", False)
