"""What a user reads of a run: metrics.jsonl (one row per iteration from its stages'
``_DONE.json``), the per-iteration table and metrics.png. The figure helpers are shared
with the sweep summary."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from iterate.config import Config
from iterate.store.paths import STAGES
from iterate.store.shards import atomic_write_bytes

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
    ("lc_win_rate", "LC", "{:.3f}"),
    ("proxy_gold_gap", "proxy-gold", "{:+.3f}"),
    ("kl_to_reference", "KL", "{:.4f}"),
    ("alpha", "α", "{:.3g}"),
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
        # the main judge's (evaluate.main_judge) win rate against the evaluation's reference
        # (evaluate.reference: the initial samples unless set), its standard error, length-
        # controlled win rate (iterate.winrate) and mean length in characters over the
        # reference's; every judge's win rates under judge_win_rates
        "win_rate": ev.get("win_rate"),
        "main_judge": ev.get("main_judge"),
        "reference": (ev.get("reference") or {}).get("kind", "initial"),
        "judge_win_rates": {
            n: {k: f.get(k) for k in ("win_rate", "win_rate_se", "lc_win_rate")}
            for n, f in (ev.get("judges") or {}).items()
            if f
        },
        # every pointwise judge's mean score (and the initial policy's), clustered errors
        "judge_means": ev.get("judge_means") or {},
        "win_rate_se": ev.get("win_rate_se"),
        "lc_win_rate": ev.get("lc_win_rate"),
        "lc_win_rate_se": ev.get("lc_win_rate_se"),
        "proxy_lc_win_rate": ev.get("judges", {}).get("reward", {}).get("lc_win_rate"),
        "length_ratio": ev.get("length_ratio"),
        "correct_rate": ev.get("correct_rate"),  # right answers (toy world), and the start's
        "initial_correct_rate": ev.get("initial_correct_rate"),
        # the same comparison under the reward model; proxy up and gold down: over-optimisation
        "proxy_win_rate": ev.get("proxy_win_rate"),
        "proxy_gold_gap": ev.get("proxy_gold_gap"),
        "heldout_reward_std": ev.get("heldout_reward_std"),  # an ensemble's disagreement
        **_reward_side(done.get("reward"), done.get("label")),
        "kl_to_reference": ho["kl"]["k1"],
        "kl_k3": ho["kl"]["k3"],
        # the KL constraint (handoff.constrain): the update's policy at scale alpha, and why
        "alpha": (done.get("constrain") or {}).get("alpha"),
        "constrain": (done.get("constrain") or {}).get("decision"),
        "response_tokens_mean": ev.get("response_tokens_mean"),
        "eos_rate": ev.get("eos_rate"),
        "accepted": ho["kl"]["accepted"],
        "seconds": {s: done[s]["seconds"] for s in STAGES if s in done},
    }


def _reward_side(reward: dict | None, label: dict | None) -> dict:
    """The reward's side of a row: how often it ordered the training samples as the gold
    judge does, a mixture's sources' means, how a generative judge's answers parsed, an
    ensemble's disagreement and, when refreshed,
    how often the reward model agreed with the judge on the new pairs before the refresh."""
    out = {}
    sources = (label or {}).get("sources") or {}
    if sources.get("reward", {}).get("gold_agreement") is not None:
        out["reward_gold_agreement"] = sources["reward"]["gold_agreement"]
    if parts := {n: s["mean"] for n, s in sources.items() if n != "reward"}:
        out["source_means"] = parts
    if judge := (label or {}).get("judge"):  # a generative judge: how its answers went
        out["judge_parsed_first_try"] = judge["parsed_first_try"]
        out["judge_unjudged"] = judge["unjudged"]
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
    v = row
    for part in key.split("/"):  # judge_means/<judge>/mean: a nested figure
        v = v.get(part) if isinstance(v, dict) else None
    return "-" if v is None else fmt.format(v)


# the judges whose figures have columns of their own (gold's win rate and mean, the reward's)
OWN_COLUMNS = ("gold", "reward")


def table(rows: list[dict], markdown: bool = False, extra: list[tuple[str, str, str]] = ()) -> str:
    """The printed table: one line per row. Against a reference other than the initial
    samples (``evaluate.reference``), the main judge's win rate against it comes before its
    length-controlled twin (``vs file``, ``vs previous``). Where the prompts have no gold
    judge, ``win rate`` is the main judge's against the initial samples; a win rate not the
    gold judge's names its judge in its header (``vs file (reward)``); every other
    pointwise judge's held-out mean (an accuracy, for a checker) gets a column of its own."""
    cols = [*extra, *COLUMNS]
    mains = "/".join(sorted({r["main_judge"] for r in rows if r.get("main_judge")}))
    by = f" ({mains})" if mains and mains != "gold" else ""  # the judge, where not gold
    if refs := sorted({r["reference"] for r in rows if r.get("reference", "initial") != "initial"}):
        at = [k for k, _, _ in cols].index("lc_win_rate")
        cols.insert(at, ("win_rate", "vs " + "/".join(refs) + by, "{:.3f}"))
    elif not any(r.get("win_rate_vs_initial") is not None for r in rows):  # no gold judge
        cols = [(k, h + by if k == "win_rate_vs_initial" else h, f) for k, h, f in cols]
    named = sorted({n for r in rows for n in r.get("judge_means") or {} if n not in OWN_COLUMNS})
    at = [k for k, _, _ in cols].index("gold_mean") + 1
    cols[at:at] = [(f"judge_means/{n}/mean", n, "{:.3f}") for n in named]
    rows = [
        r
        if r.get("win_rate_vs_initial") is not None or r.get("reference", "initial") != "initial"
        else {**r, "win_rate_vs_initial": r.get("win_rate")}
        for r in rows
    ]
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
    Iterations the KL gate rejected are crossed out in red; the KL panel names the α of an
    iteration the KL constraint took part of the way. A run with no gold judge (a real
    model's) shows its main judge's win rate and held-out mean in gold's place."""
    judge = "gold"
    if not any(r.get("win_rate_vs_initial") is not None for r in rows):
        judge = next((r["main_judge"] for r in rows if r.get("main_judge")), "main judge")
        rows = [_main_judge_as_gold(r) for r in rows]
    panels = [
        ("win_rate_vs_initial", f"win rate vs initial: {judge}, proxy --, LC :"),
        ("reward_mean", "proxy reward (train samples)"),
        ("gold_mean", f"{judge} score (held-out)"),
        ("kl_to_reference", "KL(new || ref), k1"),
        ("response_tokens_mean", "response tokens"),
    ]
    fig, axes = figure(len(panels), (4 * len(panels), 3.2))
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(str(r.get(label_key, "")) if label_key else "", []).append(r)
    for ax, (key, title) in zip(axes, panels):
        for name, rs in groups.items():
            pts = _points(rs, key)
            color = None
            if pts:
                gold = f"{judge} judge" if key == "win_rate_vs_initial" else None
                color = ax.plot(*zip(*pts), marker="o", label=name or gold)[0].get_color()
            if key == "win_rate_vs_initial":
                _win_rate_lines(ax, rs, color, one_job=not label_key)
            if key == "kl_to_reference":  # the KL constraint's α where it moved the update
                for it, kl, alpha in _points(rs, key, "alpha"):
                    if (alpha or 1) != 1:
                        kw = {"fontsize": 7, "textcoords": "offset points", "xytext": (4, -10)}
                        ax.annotate(f"α {alpha:.3g}", (it, kl), **kw)
            if bad := _points(rs, key, keep=lambda r: r.get("accepted") is False):
                rejected = "rejected" if key == panels[0][0] else None
                ax.scatter(*zip(*bad), marker="x", color="red", s=80, zorder=3, label=rejected)
        if key == "win_rate_vs_initial":
            ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)  # no better than initial
        if key == "kl_to_reference" and max_kl is not None:
            ax.axhline(max_kl, color="red", linestyle=":", linewidth=1)  # the handoff's KL budget
        panel(ax, title)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=8)
    save_figure(fig, path)


def _main_judge_as_gold(r: dict) -> dict:
    """A row with its main judge's figures where gold's are plotted: its win rate (when
    against the initial policy) and its mean score of the held-out samples."""
    main = (r.get("judge_means") or {}).get(r.get("main_judge") or "") or {}
    initial = r.get("reference", "initial") == "initial"
    return {
        **r,
        "win_rate_vs_initial": r.get("win_rate") if initial else None,
        "gold_mean": main.get("mean"),
    }


def _points(rows: list[dict], key: str, *more: str, keep=lambda r: True) -> list[tuple]:
    """(iteration, the row's ``key``, its ``more``...) of the rows that have ``key`` and
    that ``keep`` keeps."""
    return [
        (r["iteration"], r[key], *(r.get(m) for m in more))
        for r in rows
        if r.get(key) is not None and keep(r)
    ]


def _win_rate_lines(ax, rs: list[dict], color, one_job: bool) -> None:
    """The win-rate panel's lines beside the gold judge's, in its colour: the reward model's
    view of the same (--), the same judge with length held equal (:), and the main judge
    against ``evaluate.reference`` where that is not the initial policy (-.). Named in the
    legend where the plot has one job."""
    against = f"vs {rs[-1].get('reference')} ({rs[-1].get('main_judge')})"
    other = _points(rs, "win_rate", keep=lambda r: r.get("reference", "initial") != "initial")
    lines = (
        (_points(rs, "proxy_win_rate"), "--", None, 0.7, "proxy (reward model)"),
        (_points(rs, "lc_win_rate"), ":", ".", None, "length-controlled"),
        (other, "-.", "s", None, against),
    )
    for pts, style, marker, alpha, label in lines:
        if pts:
            ax.plot(
                *zip(*pts),
                linestyle=style,
                color=color,
                marker=marker,
                alpha=alpha,
                label=label if one_job else None,
            )


def figure(panels: int, size: tuple[float, float]):
    """A row of ``panels`` axes, drawn without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, panels, figsize=size)


def panel(ax, title: str) -> None:
    """A panel over iterations: its title, whole-number iterations, a light grid."""
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title, fontsize=10)
    ax.set_xlabel("iteration")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
