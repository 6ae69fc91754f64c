"""The model cards of an iteration's handoff: the hub's YAML header (base model, data set,
tags, a ``model-index`` of the held-out figures) and a body that says how the policy was
made, how to load it, and every iteration's held-out evaluation."""

from __future__ import annotations

import re
from pathlib import Path

from iterate import rewards
from iterate.checks import hub_id
from iterate.config import Config
from iterate.report.metrics import table
from iterate.store.paths import CARD, Paths
from iterate.store.shards import atomic_write_bytes, read_json
from iterate.store.stage import DONE
from iterate.train.rules import rule


def _reference(cfg: Config, row: dict) -> str:
    """What the row's main win rates compare with, in words."""
    kind = row.get("reference", "initial")
    if kind == "file":
        return f"reference outputs ({Path(str(cfg.evaluate.reference.path)).name})"
    return "the previous policy" if kind == "previous" else "the initial policy"


def card_metadata(cfg: Config, row: dict, base: str | None, library: str):
    """The YAML header the hub renders: base model, data set, tags, and a ``model-index``
    with the held-out win rate vs the initial policy (gold judge, else the reward model's),
    its length-controlled twin and KL to the reference."""
    from huggingface_hub import EvalResult, ModelCardData

    prompts = hub_id(cfg.prompts.path) if str(cfg.prompts.source) == "hub" else None
    gold = row.get("win_rate_vs_initial") is not None
    judged = [
        (
            "win_rate",
            row["win_rate_vs_initial"] if gold else row.get("proxy_win_rate"),
            f"win rate vs the initial policy ({'gold judge' if gold else cfg.reward.name})",
        ),
        (
            "lc_win_rate",
            row.get("lc_win_rate"),
            f"length-controlled win rate vs "
            f"{_reference(cfg, row)} ({row.get('main_judge') or cfg.reward.name})",
        ),
        *(
            [
                (
                    "win_rate",
                    row.get("win_rate"),
                    f"win rate vs {_reference(cfg, row)} ({row.get('main_judge')})",
                )
            ]
            if row.get("reference", "initial") != "initial"
            else []
        ),
        ("kl", row.get("kl_to_reference"), "KL(policy || reference), nats per sequence"),
        ("reward", row.get("heldout_reward_mean"), f"mean reward ({cfg.reward.name})"),
    ]
    results = [
        EvalResult(
            task_type="text-generation",
            task_name="preference alignment",
            dataset_type=prompts or str(cfg.prompts.source),
            dataset_name=f"held-out prompts ({prompts or cfg.prompts.source})",
            metric_type=kind,
            metric_value=value,
            metric_name=name,
        )
        for kind, value, name in judged
        if value is not None
    ]
    return ModelCardData(
        base_model=hub_id(base),
        datasets=[prompts] if prompts else None,
        library_name=library,
        model_name=f"{cfg.run_name}-iteration-{row['iteration']}",
        tags=["iterate", "rlhf", str(cfg.update.name), "iterative-preference-learning"],
        eval_results=results or None,
    )


def write_cards(cfg: Config, paths: Paths, rows: list[dict]) -> list[Path]:
    """The model cards of the last row's iteration, once its row is complete:
    ``handoff/policy/README.md`` (the merged policy) and, when the rule trained a LoRA
    adapter, ``handoff/adapter/README.md``; each can be pushed to the hub as it is."""
    row = rows[-1]
    i = row["iteration"]
    # the settings this rule read, as its update stage recorded them
    update = read_json(paths.stage(i, "update") / DONE)["config"]
    start = update["policy"].replace("${run}", str(paths.run))  # the adapter's base
    written = []
    for folder, where, library in (
        ("policy", paths.handoff_policy(i), "transformers"),
        ("adapter", paths.handoff_adapter(i), "peft"),
    ):
        if not where.is_dir():
            continue
        base = paths.base_policy if folder == "policy" else start
        meta = card_metadata(cfg, row, base, library)
        text = f"---\n{meta.to_yaml()}\n---\n\n" + card_text(cfg, paths, rows, update, folder)
        atomic_write_bytes(where / CARD, text.encode())
        written.append(where / CARD)
    return written


def which_policy(path: str, paths: Paths) -> str:
    """A policy the card names, by what it is rather than where it lies on this machine:
    the initial policy (with its hub id, when it has one) or an iteration's."""
    if m := re.search(r"iter_(\d+)/handoff/policy$", path):
        return f"the policy of iteration {int(m.group(1))}"
    hub = hub_id(paths.base_policy)
    return "the initial policy" + (f" (`{hub}`)" if hub and path == paths.base_policy else "")


def _reward_line(cfg: Config, row: dict) -> str:
    """What the reward was: a model, a judge, a function, or a mixture's sources with their
    weights and this iteration's means; and how often it ordered samples as the gold judge
    does."""
    line = rewards.kind(cfg.reward.kind).card(cfg, row)
    if (agree := row.get("reward_gold_agreement")) is not None:
        line += f" (orders {agree:.1%} of sample pairs as the gold judge does)"
    return line


def card_text(cfg: Config, paths: Paths, rows: list[dict], update: dict, folder: str) -> str:
    """The card's body: what this is, how it was made (the settings the rule read), how to
    load it, and the held-out evaluation of every iteration up to it."""
    uc, gc, i = cfg.update, cfg.generate, rows[-1]["iteration"]
    hyper = {k: v for k, v in update["update"].items() if k not in ("name", "lora")}
    lora = update["update"].get("lora", {})
    how = (
        f"LoRA r={lora['r']} alpha={lora['alpha']} dropout={lora['dropout']}"
        if lora.get("enabled")
        else "full fine-tuning"
    )
    samples = rule(uc.name).samples.format(n=gc.n, pairs=cfg.pairs.rule, group=uc.group_size)
    source = f"`{cfg.prompts.source}`" + (f" ({cfg.prompts.path})" if cfg.prompts.path else "")
    refresh = cfg.reward.refresh
    start = which_policy(update["policy"], paths)  # after a rejection: not always i - 1's
    verdict = "accepted" if rows[-1]["accepted"] else "rejected"
    if folder == "policy":
        what = f"The policy after iteration {i}: {start} with this iteration's update merged in."
        use = 'AutoModelForCausalLM.from_pretrained("<this folder, or its hub repo>")'
    else:
        what = f"The LoRA adapter of iteration {i}'s update, to put on {start}."
        use = 'PeftModel.from_pretrained(base, "<this folder, or its hub repo>")'
    lines = [
        f"# {cfg.run_name}: iteration {i}",
        "",
        f"{what} Made with `iterate` (iterative online preference learning).",
        "",
        f"- **Base model:** {cfg.model.name}"
        + (f" (`{hub_id(paths.base_policy)}`)" if hub_id(paths.base_policy) else ""),
        _reward_line(cfg, rows[-1])
        + (
            f", refreshed each iteration on {refresh.pairs} pairs judged by `{refresh.judge}`"
            if rewards.refreshes(cfg) and not rule(uc.name).on_policy
            else ""
        ),
        f"- **Data:** {cfg.prompts.per_iteration} prompts per iteration from {source}; {samples}"
        f" (temperature {gc.temperature}, top-p {gc.top_p}, at most {gc.max_tokens} new tokens)",
        f"- **Update:** {uc.name}, {how}",
        "- **Settings the update read:** " + ", ".join(f"{k}={v}" for k, v in hyper.items()),
        f"- **KL reference:** {which_policy(update['reference'], paths)}; the handoff's budget"
        f" {cfg.handoff.max_kl} nats per sequence: {verdict}" + _taken(cfg, rows[-1].get("alpha")),
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM"
        if folder == "policy"
        else "from peft import PeftModel",
        f"model = {use}",
        "```",
        "",
        "## Held-out evaluation, iteration by iteration",
        "",
        table(rows, markdown=True),
    ]
    return "\n".join(lines)


def _taken(cfg, alpha: float | None) -> str:
    """How far along its update the handed-on policy is, where the KL constraint moved it."""
    if alpha is None or alpha == 1:
        return ""
    if alpha < 1:
        return (
            f"; the update taken at α={alpha:.4g} of its way from the starting policy, the most"
            f" that kept the KL under {cfg.handoff.kl_target:g} of the budget (the KL constraint)"
        )
    return (
        f"; the update taken {alpha:.4g} times its way from the starting policy (extrapolated:"
        " the run's reward preferred it by more than 2 standard errors, within the KL target)"
    )
