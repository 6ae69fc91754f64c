"""A sweep side by side (Hydra multirun): ``<sweep>/summary.{md,png}``, and mean ± sd over
seeds when jobs differ only in ``seed=``. ``iterate.run.cli.SweepSummary`` is the Hydra
callback that writes it when the multirun ends."""

from __future__ import annotations

import logging
from pathlib import Path

from iterate.report.metrics import figure, panel, plot, save_figure, table
from iterate.store.shards import read_jsonl

log = logging.getLogger(__name__)


def short_labels(names: list[str]) -> dict[str, str]:
    """Job folder names (``k=v,k2=v2``) shortened to the overrides that differ between jobs:
    ``update=dpo`` rather than the settings every job shares."""
    parts = {n: n.split(",") for n in names}
    common = set.intersection(*(set(p) for p in parts.values())) if len(names) > 1 else set()
    return {n: ",".join(x for x in p if x not in common) or n for n, p in parts.items()}


SEED_KEYS = (  # (key, header): the columns averaged over seeds
    ("win_rate_vs_initial", "win rate"),
    ("lc_win_rate", "LC win rate"),
    ("correct_rate", "correct"),
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
    fig, axes = figure(2, (10, 3.6))
    for ax, key, title in zip(
        axes,
        ("win_rate_vs_initial", "proxy_gold_gap"),
        ("gold win rate vs initial (mean ± sd over seeds)", "proxy - gold win rate"),
    ):
        for name in dict.fromkeys(r["job"] for r in rows):
            pts = [(r["iteration"], *r[key]) for r in rows if r["job"] == name and key in r]
            if pts:
                x, m, sd = zip(*pts)
                ax.errorbar(x, m, yerr=sd, marker="o", capsize=3, label=name)
        ax.axhline(0.5 if key == "win_rate_vs_initial" else 0.0, color="grey", ls="--", lw=1)
        panel(ax, title)
    axes[0].legend(fontsize=7)
    save_figure(fig, path)


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
