"""The run inspector: ``python -m iterate show runs/<run> [samples=K] [iteration=I]
[heldout=true]`` (or ``iterate show ...``).

Prints where a run is, from its files alone (it never takes the run's lock, so it can look
at a run that is going): each iteration's stages as done / partial (k of n shards or
steps) / missing, with rows and drops by reason; the metrics table; with ``samples=K``, the
best and worst K responses of iteration I (default: the last with scored responses) by
reward: the best-of-n samples, or the held-out ones with ``heldout=true`` (the only ones a
PPO or ReMax iteration has).
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

from iterate import errors
from iterate.report import metrics, runinfo
from iterate.store import runlock
from iterate.store.paths import Paths, run_config
from iterate.store.shards import read_json, read_jsonl

USAGE = "usage: python -m iterate show RUN_FOLDER [samples=K] [iteration=I] [heldout=true]"


def _stage_line(s: runinfo.StageState) -> str:
    parts = [f"  {s.name:<17}{s.describe():<26}"]
    parts += [f"{n} {unit}" for unit, n in s.counts.items()]
    if s.dropped:
        parts.append("dropped " + ", ".join(f"{k}={v}" for k, v in s.dropped.items()))
    if s.seconds is not None:
        parts.append(f"{s.seconds:.0f}s")
    line = "  ".join(parts).rstrip()
    for name, st in s.sources.items():  # the reward and a mixture's sources, one line each
        weight = f" x {st['weight']:g}" if "weight" in st else ""
        agree = st.get("gold_agreement")
        agree = f", agrees with gold on {agree:.1%} of pairs" if agree is not None else ""
        line += f"\n{'':21}{name}{weight}: mean {st['mean']:+.4f}, std {st['std']:.4f}{agree}"
    if j := s.judge:  # a generative judge's answers: label/judgements/
        line += (
            f"\n{'':21}judge: {j['questions']} questions, {j['answers']} answers, "
            f"{j['parsed_first_try']:.1%} parsed at the first try, {j['unjudged']} "
            "left unjudged (in judgements/)"
        )
    return line


def _stopped(stopped: dict) -> str:
    """What ``_STOPPED.json`` says: when, why, and what a rerun of the command does."""
    return (
        f"stopped {stopped['at']}, {stopped['says']} (exit {stopped['status']}): "
        f"{stopped['error']}\n  {errors.resumes(stopped['status'])}"
    )


def status(run: Path) -> str:
    """The stage table and the metrics table of a run folder."""
    paths = Paths(run=run, base_policy="")
    holder, stopped = runlock.holder(run), read_json(paths.stopped)
    if stopped and not paths.config.exists():  # stopped before the run folder was made
        return f"{run}: {_stopped(stopped)}"
    cfg = run_config(run)
    finished = paths.finished.exists()
    if holder:
        where = (
            f"running (pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')})"
        )
    elif stopped:
        where = _stopped(stopped)
    elif finished:
        where = "finished"
    else:
        where = "not running, not finished (killed?): the same command resumes"
    lines = [f"{run}: update={cfg['update']['name']}, model={cfg['model']['name']}; {where}"]
    for group, stages in runinfo.states(run).items():
        lines.append(f"{group}:" if group != "before" else "before iteration 0:")
        lines += [_stage_line(s) for s in stages]
    rows = read_jsonl(paths.metrics)
    lines += ["", "metrics (metrics.jsonl):", metrics.table(rows) if rows else "  (no row yet)"]
    return "\n".join(lines)


def samples(run: Path, i: int, k: int, heldout: bool) -> str:
    df = runinfo.scored(run, i, heldout, keep=k)
    rows = runinfo.extremes(df, k)
    if not rows:
        return (
            f"iteration {i}: no scored responses on disk yet (the held-out ones' rewards are "
            "kept in evaluate/scores/, which runs made before it lack)"
        )
    out = [f"iteration {i}: the best and worst {k} {df.attrs['which']} responses by reward"]
    for r in rows:
        gold = f"  gold {r['gold']:+.3f}" if r.get("gold") is not None else ""
        out.append(f"\n[{r['rank']}] reward {r['reward']:+.3f}{gold}")
        out.append(textwrap.indent(f"prompt: {r['prompt']}\nresponse: {r['response']}", "  "))
    return "\n".join(out)


def parse(argv: list[str]) -> tuple[Path, dict]:
    """``RUN key=value ...`` -> (run folder, options); a bad argument names itself."""
    if not argv or argv[0] in ("-h", "--help"):
        raise SystemExit(USAGE)
    run, opts = Path(argv[0]), {"samples": 0, "iteration": None, "heldout": False}
    for arg in argv[1:]:
        key, sep, value = arg.partition("=")
        if not sep or key not in opts:
            raise SystemExit(f"unknown argument {arg!r}\n{USAGE}")
        try:
            opts[key] = value.lower() in ("1", "true", "yes") if key == "heldout" else int(value)
        except ValueError:
            raise SystemExit(f"{key} must be a whole number, not {value!r}") from None
    if not run.is_dir():
        raise SystemExit(f"{run}: no such run folder")
    return run, opts


def main(argv: list[str] | None = None) -> int:
    run, opts = parse(sys.argv[1:] if argv is None else argv)
    try:
        print(status(run))
        if opts["samples"]:
            i = opts["iteration"]
            if i is None:  # the last iteration with scored responses
                have = [
                    j
                    for j in runinfo.iterations(run)
                    if runinfo.scored_source(run, j, opts["heldout"])
                ]
                i = have[-1] if have else 0
            print("\n" + samples(run, i, opts["samples"], opts["heldout"]))
    except (FileNotFoundError, errors.BadInput) as e:  # a damaged file is named, no traceback
        print(f"{run}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
