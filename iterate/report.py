"""What a user reads: metrics.jsonl, the per-iteration table, metrics.png, model cards,
and the side-by-side summary of a sweep."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from hydra.experimental.callback import Callback

from iterate.config import Config
from iterate.paths import STAGES, Paths
from iterate.rules import rule
from iterate.shards import DONE, atomic_write_bytes, read_json, read_jsonl
from iterate.validate import hub_id

log = logging.getLogger(__name__)

COLUMNS = [  # (key, header, format)
    ("iteration", "iter", "{}"),
    ("update", "update", "{}"),
    ("prompts", "prompts", "{}"),
    ("responses", "responses", "{}"),
    ("reward_mean", "reward", "{:.3f}"),
    ("reward_best_mean", "best-of-n", "{:.3f}"),
    ("gold_mean", "gold", "{:.3f}"),
    ("win_rate_vs_initial", "win rate", "{:.3f}"),
    ("proxy_gold_gap", "proxy-gold", "{:+.3f}"),
    ("kl_to_reference", "KL", "{:.4f}"),
    ("response_tokens_mean", "tokens", "{:.1f}"),
    ("eos_rate", "EOS", "{:.2f}"),
    ("accepted", "accepted", "{}"),
]


def metrics_row(cfg: Config, i: int, done: dict[str, dict]) -> dict:
    """One ``metrics.jsonl`` object from the ``_DONE.json`` of each stage of iteration i.
    The training-side reward is the labelled best-of-n samples' (pair rules) or the
    rollouts' (PPO, ReMax); the held-out figures are the evaluate stage's."""
    upd, ev, ho = done["update"], done["evaluate"], done["handoff"]
    if "label" in done:
        train = {
            "prompts": done["generate"]["prompts_out"],
            "responses": done["label"]["rows_out"],
            "pairs": done["pairs"]["rows_out"],
            "reward_mean": done["label"]["reward_mean"],
            "reward_best_mean": done["pairs"]["reward_best_mean"],
            "gold_train_mean": done["label"].get("gold_mean"),
        }
    else:
        train = {
            "prompts": upd["rows_in"],
            "responses": upd["responses"],
            "pairs": None,
            "reward_mean": upd["reward_mean"],
            "reward_best_mean": None,
            "gold_train_mean": None,
        }
    return {
        "iteration": i,
        "update": str(cfg.update.name),
        **train,
        "gold_mean": ev.get("gold_mean"),
        "heldout_reward_mean": ev.get("heldout_reward_mean"),
        "win_rate_vs_initial": ev.get("win_rate_vs_initial"),
        # the same comparison under the reward model; proxy up and gold down: over-optimisation
        "proxy_win_rate": ev.get("proxy_win_rate"),
        "proxy_gold_gap": ev.get("proxy_gold_gap"),
        "heldout_reward_std": ev.get("heldout_reward_std"),  # an ensemble's disagreement
        **_refresh(done.get("reward"), done.get("label")),
        "kl_to_reference": ho["kl"]["k1"],
        "kl_k3": ho["kl"]["k3"],
        "response_tokens_mean": ev.get("response_tokens_mean"),
        "eos_rate": ev.get("eos_rate"),
        "accepted": ho["kl"]["accepted"],
        "seconds": {s: done[s]["seconds"] for s in STAGES if s in done},
    }


def _refresh(reward: dict | None, label: dict | None) -> dict:
    """The reward model's side of a row: its disagreement on the training samples and, when
    refreshed, how often it agreed with the judge on the new pairs before the refresh."""
    out = {}
    if label and label.get("reward_std_mean") is not None:
        out["reward_std_mean"] = label["reward_std_mean"]
    if reward:
        out["judged_pairs"] = reward["judged_pairs"]
        out["rm_agreement_before"] = reward["rm_agreement_before"]
        out["judged_heldout_accuracy_after"] = reward["judged_heldout_accuracy_after"]
    return out


def write_metrics(path: Path, rows: list[dict]) -> None:
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in rows).encode())


def _cell(row: dict, key: str, fmt: str) -> str:
    v = row.get(key)
    return "-" if v is None else fmt.format(v)


def table(rows: list[dict], markdown: bool = False, extra: list[tuple[str, str, str]] = ()) -> str:
    cols = [*extra, *COLUMNS]
    cells = [[h for _, h, _ in cols]] + [[_cell(r, k, f) for k, _, f in cols] for r in rows]
    if any("seconds" in r for r in rows):
        cells[0].append("seconds (gen/label/update/eval/handoff)")
        for line, r in zip(cells[1:], rows):
            s = r.get("seconds", {})
            line.append(
                "/".join(
                    f"{s.get(k, 0):.0f}"
                    for k in ("generate", "label", "update", "evaluate", "handoff")
                )
            )
    if markdown:
        head = "| " + " | ".join(cells[0]) + " |\n|" + "---|" * len(cells[0]) + "\n"
        return head + "".join("| " + " | ".join(c) + " |\n" for c in cells[1:])
    widths = [max(len(c[j]) for c in cells) for j in range(len(cells[0]))]
    lines = ["  ".join(c[j].rjust(widths[j]) for j in range(len(c))) for c in cells]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def plot(
    rows: list[dict], path: Path, label_key: str | None = None, max_kl: float | None = None
) -> None:
    """One panel per metric over iterations; one line per job when ``label_key`` is given.
    Iterations the KL gate rejected are crossed out in red."""
    panels = [
        ("win_rate_vs_initial", "win rate vs initial: gold, proxy --"),
        ("reward_mean", "proxy reward (train samples)"),
        ("gold_mean", "gold score (held-out)"),
        ("kl_to_reference", "KL(new || ref), k1"),
        ("response_tokens_mean", "response tokens"),
    ]
    fig, axes = _figure(len(panels), (4 * len(panels), 3.2))
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(str(r.get(label_key, "")) if label_key else "", []).append(r)
    for ax, (key, title) in zip(axes, panels):
        for name, rs in groups.items():
            pts = [(r["iteration"], r[key]) for r in rs if r.get(key) is not None]
            color = None
            if pts:
                gold = "gold judge" if key == "win_rate_vs_initial" else None
                color = ax.plot(*zip(*pts), marker="o", label=name or gold)[0].get_color()
            proxy = [(r["iteration"], r.get("proxy_win_rate")) for r in rs]
            proxy = [p for p in proxy if p[1] is not None]
            if key == "win_rate_vs_initial" and proxy:  # the reward model's view of the same
                ax.plot(*zip(*proxy), linestyle="--", color=color, alpha=0.7,
                        label="proxy (reward model)" if not label_key else None)  # fmt: skip
            bad = [
                (r["iteration"], r[key])
                for r in rs
                if r.get(key) is not None and r.get("accepted") is False
            ]
            if bad:
                ax.scatter(
                    *zip(*bad),
                    marker="x",
                    color="red",
                    s=80,
                    zorder=3,
                    label="rejected" if key == panels[0][0] else None,
                )
        if key == "win_rate_vs_initial":
            ax.axhline(
                0.5, color="grey", linestyle="--", linewidth=1
            )  # no better than the initial policy
        if key == "kl_to_reference" and max_kl is not None:
            ax.axhline(max_kl, color="red", linestyle=":", linewidth=1)  # the handoff's KL budget
        _panel(ax, title)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=8)
    _save(fig, path)


def _figure(panels: int, size: tuple[float, float]):
    """A row of ``panels`` axes, drawn without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, panels, figsize=size)


def _panel(ax, title: str) -> None:
    """A panel over iterations: its title, whole-number iterations, a light grid."""
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title, fontsize=10)
    ax.set_xlabel("iteration")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def card_metadata(cfg: Config, row: dict, base: str | None, library: str):
    """The YAML header the hub renders: base model, data set, tags, and a ``model-index``
    with the held-out win rate vs the initial policy (gold judge, else the reward model's)
    and KL to the reference."""
    from huggingface_hub import EvalResult, ModelCardData

    prompts = hub_id(cfg.prompts.path) if str(cfg.prompts.source) == "hub" else None
    gold = row.get("win_rate_vs_initial") is not None
    judged = [
        ("win_rate", row["win_rate_vs_initial"] if gold else row.get("proxy_win_rate"),
         f"win rate vs the initial policy ({'gold judge' if gold else cfg.reward.name})"),
        ("kl", row.get("kl_to_reference"), "KL(policy || reference), nats per sequence"),
        ("reward", row.get("heldout_reward_mean"), f"mean reward ({cfg.reward.name})"),
    ]  # fmt: skip
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
        base_model=hub_id(base), datasets=[prompts] if prompts else None,
        library_name=library, model_name=f"{cfg.run_name}-iteration-{row['iteration']}",
        tags=["iterate", "rlhf", str(cfg.update.name), "iterative-preference-learning"],
        eval_results=results or None,
    )  # fmt: skip


def write_cards(cfg: Config, paths: Paths, rows: list[dict]) -> list[Path]:
    """The model cards of the last row's iteration, once its row is complete:
    ``handoff/policy/README.md`` (the merged policy) and, when the rule trained a LoRA
    adapter, ``handoff/adapter/README.md``; each can be pushed to the hub as it is."""
    row = rows[-1]
    i, handoff = row["iteration"], paths.stage(row["iteration"], "handoff")
    # the settings this rule read, as its update stage recorded them
    update = read_json(paths.stage(i, "update") / DONE)["config"]
    start = update["policy"].replace("${run}", str(paths.run))  # the adapter's base
    written = []
    for folder, library in (("policy", "transformers"), ("adapter", "peft")):
        if not (handoff / folder).is_dir():
            continue
        base = paths.base_policy if folder == "policy" else start
        meta = card_metadata(cfg, row, base, library)
        text = f"---\n{meta.to_yaml()}\n---\n\n" + card_text(cfg, paths, rows, update, folder)
        atomic_write_bytes(handoff / folder / "README.md", text.encode())
        written.append(handoff / folder / "README.md")
    return written


def which_policy(path: str, paths: Paths) -> str:
    """A policy the card names, by what it is rather than where it lies on this machine:
    the initial policy (with its hub id, when it has one) or an iteration's."""
    if m := re.search(r"iter_(\d+)/handoff/policy$", path):
        return f"the policy of iteration {int(m.group(1))}"
    hub = hub_id(paths.base_policy)
    return "the initial policy" + (f" (`{hub}`)" if hub and path == paths.base_policy else "")


def card_text(cfg: Config, paths: Paths, rows: list[dict], update: dict, folder: str) -> str:
    """The card's body: what this is, how it was made (the settings the rule read), how to
    load it, and the held-out evaluation of every iteration up to it."""
    uc, gc, i = cfg.update, cfg.generate, rows[-1]["iteration"]
    hyper = {k: v for k, v in update["update"].items() if k not in ("name", "lora")}
    lora = update["update"].get("lora", {})
    how = (f"LoRA r={lora['r']} alpha={lora['alpha']} dropout={lora['dropout']}"
           if lora.get("enabled") else "full fine-tuning")  # fmt: skip
    samples = rule(uc.name).samples.format(n=gc.n, pairs=cfg.pairs.rule)
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
        f"- **Reward model:** {cfg.reward.name}"
        + (
            f", refreshed each iteration on {refresh.pairs} pairs judged by `{refresh.judge}`"
            if refresh.pairs and not rule(uc.name).on_policy
            else ""
        ),  # fmt: skip
        f"- **Data:** {cfg.prompts.per_iteration} prompts per iteration from {source}; {samples}"
        f" (temperature {gc.temperature}, top-p {gc.top_p}, at most {gc.max_tokens} new tokens)",
        f"- **Update:** {uc.name}, {how}",
        "- **Settings the update read:** " + ", ".join(f"{k}={v}" for k, v in hyper.items()),
        f"- **KL reference:** {which_policy(update['reference'], paths)}; the handoff's budget"
        f" {cfg.handoff.max_kl} nats per sequence: {verdict}",
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM"
        if folder == "policy"
        else "from peft import PeftModel",  # fmt: skip
        f"model = {use}",
        "```",
        "",
        "## Held-out evaluation, iteration by iteration",
        "",
        table(rows, markdown=True),
    ]
    return "\n".join(lines)


def short_labels(names: list[str]) -> dict[str, str]:
    """Job folder names (``k=v,k2=v2``) shortened to the overrides that differ between jobs:
    ``update=dpo`` rather than the settings every job shares."""
    parts = {n: n.split(",") for n in names}
    common = set.intersection(*(set(p) for p in parts.values())) if len(names) > 1 else set()
    return {n: ",".join(x for x in p if x not in common) or n for n, p in parts.items()}


SEED_KEYS = (  # (key, header): the columns averaged over seeds
    ("win_rate_vs_initial", "win rate"),
    ("gold_mean", "gold"),
    ("proxy_gold_gap", "proxy-gold"),
    ("kl_to_reference", "KL"),
    ("reward_mean", "reward"),
)


def over_seeds(rows: list[dict]) -> list[dict]:
    """Rows of jobs that differ only in ``seed=`` merged per iteration: each key's mean and
    standard deviation (``{key: (mean, sd)}``), the seeds and how many were accepted. Empty
    when no job was run with more than one seed."""
    import statistics

    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        name = ",".join(x for x in r["job"].split(",") if not x.startswith("seed="))
        groups.setdefault((name or "default", r["iteration"]), []).append(r)
    if all(len(g) < 2 for g in groups.values()):
        return []
    out = []
    for (name, i), g in groups.items():
        row = {"job": name, "iteration": i, "seeds": len(g)}
        row["accepted"] = sum(bool(r.get("accepted")) for r in g)
        for key, _ in SEED_KEYS:
            xs = [r[key] for r in g if r.get(key) is not None]
            if xs:
                row[key] = (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)
        out.append(row)
    return sorted(out, key=lambda r: (r["job"], r["iteration"]))


def seeds_table(rows: list[dict]) -> str:
    """The over-seeds rows as a markdown table, mean ± sd."""
    head = ["job", "iter", "seeds", *(h for _, h in SEED_KEYS), "accepted"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["job"], str(r["iteration"]), str(r["seeds"])]
        for key, _ in SEED_KEYS:
            cells.append("{:.3f} ± {:.3f}".format(*r[key]) if key in r else "-")
        cells.append(f"{r['accepted']}/{r['seeds']}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_seeds(rows: list[dict], path: Path) -> None:
    """Gold win rate and proxy-gold gap per iteration, mean ± sd over seeds, a line a job."""
    fig, axes = _figure(2, (10, 3.6))
    for ax, key, title in zip(
        axes, ("win_rate_vs_initial", "proxy_gold_gap"),
        ("gold win rate vs initial (mean ± sd over seeds)", "proxy - gold win rate"),
    ):  # fmt: skip
        for name in dict.fromkeys(r["job"] for r in rows):
            pts = [(r["iteration"], *r[key]) for r in rows if r["job"] == name and key in r]
            if pts:
                x, m, sd = zip(*pts)
                ax.errorbar(x, m, yerr=sd, marker="o", capsize=3, label=name)
        ax.axhline(0.5 if key == "win_rate_vs_initial" else 0.0, color="grey", ls="--", lw=1)
        _panel(ax, title)
    axes[0].legend(fontsize=7)
    _save(fig, path)


def summarize_sweep(sweep_dir: Path) -> str | None:
    """Side-by-side table and plot of the jobs of a sweep (``<sweep>/summary.{md,png}``)."""
    rows = []
    files = sorted(sweep_dir.glob("*/metrics.jsonl"))
    label = short_labels([m.parent.name for m in files])
    for metrics in files:
        rows += [{"job": label[metrics.parent.name], **r} for r in read_jsonl(metrics)]
    if not rows:
        return None
    text = table(rows, extra=[("job", "job", "{}")])
    md = table(rows, markdown=True, extra=[("job", "job", "{}")])
    if seeds := over_seeds(rows):
        text += "\n\nmean ± sd over seeds:\n" + seeds_table(seeds)
        md += "\n## Mean ± sd over seeds\n\n" + seeds_table(seeds)
        plot_seeds(seeds, sweep_dir / "summary_seeds.png")
    (sweep_dir / "summary.md").write_text(md)
    plot(rows, sweep_dir / "summary.png", label_key="job")
    return text


class SweepSummary(Callback):
    """Hydra callback: after a multirun, print and write the jobs side by side."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        text = summarize_sweep(sweep_dir)
        if text:
            log.info("sweep summary (%s/summary.md, summary.png):\n%s", sweep_dir, text)
            print(text)
