"""Hand the updated policy to the next iteration: merge, save, accept or reject, model card.

1. Merge the LoRA adapter into the policy and ``save_pretrained`` it (safetensors +
   tokenizer) into ``handoff/policy/`` (written under a temporary name, renamed when whole);
   a whole model the update trained is linked there, not written twice.
2. Read KL(new || reference) from the evaluate stage and accept when its k1 is within
   ``handoff.max_kl`` (and, where asked, the length gates hold: ``gate``); write the
   decision to ``kl.json``.
3. Keep the update's LoRA adapter beside it (``handoff/adapter/``), so either can be pushed.

The model cards (``policy/README.md``, ``adapter/README.md``) are written by the loop once
the iteration's metrics row is complete (``report.cards.write_cards``).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from iterate import progress
from iterate.config import Config
from iterate.stages import evaluate
from iterate.store.paths import CARD, Paths
from iterate.store.shards import atomic_write_json, link_tree, read_json, write_folder
from iterate.store.stage import Stage, counted
from iterate.train import models

log = logging.getLogger(__name__)


def merge(cfg: Config, policy: str, trained: Path, adapter: bool, out: Path) -> None:
    """The update's policy as one model folder: the adapter merged, or the full model. A
    full model saved in the policy's dtype is that folder already: its files are linked,
    not loaded and written again (a 7B policy's 14.5 GB once per iteration, not twice)."""
    dev, dtype = models.device(str(cfg.device)), str(cfg.model.dtype)
    saved = read_json(Path(trained) / "config.json", default={})
    if not adapter and (saved.get("dtype") or saved.get("torch_dtype")) == dtype:
        link_tree(Path(trained), out)
        return
    if adapter:
        model = models.load_policy(policy, dtype, dev, str(trained)).merge_and_unload()
    else:
        model = models.load_policy(str(trained), dtype, dev)
    model.save_pretrained(out)
    models.load_tokenizer(str(trained)).save_pretrained(out)


def gate(cfg: Config, evaluation: dict) -> dict:
    """Accept the new policy when its KL(new || reference), k1, is within the budget and,
    where asked, its held-out responses are not longer than ``max_length_ratio`` times the
    reference's and its length-controlled win rate is at least ``min_lc_win_rate`` (the
    evaluation's main judge), and, with ``reward_tolerance_se``, when the run's reward does
    not prefer the policy the iteration started from: the new policy's held-out win rate
    against it (``vs_previous``) is at least one half less that many standard errors. A gate
    asked for whose figure is missing (no judge figures, a rate that could not be fitted)
    fails: a gate that cannot be checked does not pass. The decision names every condition
    that failed. Beside the KL, the upper end of its 95% interval (``k1_upper``, from its
    standard error over prompts) is recorded."""
    hc = cfg.handoff
    kl = {**evaluation["kl"], "max_kl": hc.max_kl}
    failed = [f"KL {kl['k1']:.4g} > {hc.max_kl:g}"] if kl["k1"] > hc.max_kl else []
    if kl.get("k1_se") is not None:
        kl["k1_upper"] = round(kl["k1"] + 1.96 * kl["k1_se"], 4)
    if (tol := hc.reward_tolerance_se) is not None:
        prev = kl["vs_previous"] = evaluation.get("vs_previous") or {}
        wr, se = prev.get("win_rate"), prev.get("win_rate_se")
        floor = None if wr is None else round(0.5 - tol * se, 4)
        kl["min_win_rate_vs_previous"] = floor
        if wr is None or wr < floor:
            was = "initial" if prev.get("iteration") is None else f"iteration {prev['iteration']}'s"
            shown = "none (not measured)" if wr is None else f"{wr:.3g} < {floor:.3g}"
            failed.append(f"reward's win rate against the {was} policy {shown} (1/2 - {tol:g} se)")
    if hc.max_length_ratio is not None:
        ratio = kl["length_ratio"] = evaluation.get("length_ratio")
        kl["max_length_ratio"] = hc.max_length_ratio
        if ratio is None or ratio > hc.max_length_ratio:
            shown = "none (not measured)" if ratio is None else f"{ratio:.3g}"
            failed.append(f"length ratio {shown} > {hc.max_length_ratio:g}")
    if hc.min_lc_win_rate is not None:
        lc = kl["lc_win_rate"] = evaluation.get("lc_win_rate")
        kl["min_lc_win_rate"] = hc.min_lc_win_rate
        if lc is None or lc < hc.min_lc_win_rate:
            shown = "none (not fitted)" if lc is None else f"{lc:.3g}"
            failed.append(f"LC win rate {shown} < {hc.min_lc_win_rate:g}")
    kl["accepted"] = not failed
    kl["failed"] = failed
    kl["decision"] = "accept" if not failed else f"reject ({hc.on_reject}): " + "; ".join(failed)
    return kl


def run(cfg: Config, paths: Paths, i: int, policy: str, evaluation: dict) -> dict:
    hc = cfg.handoff
    conf = {"handoff": counted(cfg, "handoff"), "policy": policy}  # (constrain's own: its stage)
    stage = Stage(
        paths.stage(i, "handoff"),
        "handoff",
        conf,
        inputs=[
            paths.stage(i, "update"),
            *evaluate.constrained(cfg, paths, i),
            paths.stage(i, "evaluate"),
        ],
    )
    if stage.check(cfg.force):
        return stage.read_done()
    timer = progress.Timer()
    trained, adapter = paths.trained_policy(i)
    if not paths.handoff_policy(i).exists():  # merged and saved, then renamed into place
        with timer("merge_save_s"):
            merged = lambda tmp: merge(cfg, policy, trained, adapter, tmp)  # noqa: E731
            write_folder(paths.handoff_policy(i), merged)
    if adapter and not paths.handoff_adapter(i).exists():
        no_card = shutil.ignore_patterns(CARD)  # peft's; ours follows with the row
        copy = lambda tmp: shutil.copytree(trained, tmp, ignore=no_card)  # noqa: E731
        write_folder(paths.handoff_adapter(i), copy)
    kl = gate(cfg, evaluation)
    atomic_write_json(stage.path / "kl.json", kl)
    verb = "accepted" if kl["accepted"] else "REJECTED: " + "; ".join(kl["failed"])
    lengths = "".join(
        f", {k} {kl[k]}" for k in ("length_ratio", "lc_win_rate") if kl.get(k) is not None
    )
    log.info(
        "handoff: KL(new || ref) k1 %.4f k3 %.4f (budget %.3g)%s: %s",
        kl["k1"],
        kl["k3"],
        hc.max_kl,
        lengths,
        verb,
    )
    return stage.finish(kl=kl, timings=timer.seconds)
