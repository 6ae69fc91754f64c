"""What the command line prints and returns when a run ends early: one line saying what
went wrong and where, the traceback in the run's log file only, and an exit status a
script can act on: 2 bad input (a setting, a path, a file's row, a run folder in use or
changed; Hydra's own composition errors too), 1 a failure, 130 Ctrl-C, 143 SIGTERM
(``errors.status_of``). A rerun of the same command resumes after 1, 130 and 143."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from pathlib import Path

from hydra.experimental.callback import Callback

from iterate import errors

log = logging.getLogger("iterate")


def _to_log_file(text: str) -> str | None:
    """Write ``text`` to the log files of the root logger (Hydra's ``<run>/__main__.log``);
    returns the first one's path."""
    paths = []
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.FileHandler):
            h.stream.write(text)
            h.flush()
            paths.append(h.baseFilename)
    return paths[0] if paths else None


# (job folder, exit status) of a sweep's jobs that stopped with 1 or 2: the sweep goes on
# to its other jobs and ends with the highest status (``SweepSummary``)
STOPPED_JOBS: list[tuple[str, int]] = []


def exit_status(fn: Callable[[], object]) -> int:
    """Run ``fn``; 0 when it returns, else the status above, having said why in one line."""
    from iterate import faults

    faults.catch_interrupts()
    interrupted = False
    try:
        fn()
        faults.stop_if_interrupted()  # a Ctrl-C swallowed after the last stage boundary
        return 0
    except BaseException as e:
        if not isinstance(e, Exception | KeyboardInterrupt):
            raise  # SystemExit and the like: not ours to report
        status = errors.status_of(e)
        if isinstance(e, KeyboardInterrupt):
            # a second one, while the stop is reported and the process shuts down, is
            # ignored (the next ``exit_status`` in this process, a test's, catches again)
            interrupted = True
            faults.ignore_interrupts()
            log.error("%s: %s", errors.WORDS[status], errors.resumes(status))
            return status
        where = _to_log_file(traceback.format_exc())
        if status == 2:
            log.error("bad input: %s", e)
            log.debug("traceback in %s", where)
        else:  # a failure: say what and where the traceback is
            said = f" (traceback in {where}; the same command resumes)" if where else ""
            log.error("failed: %s: %s%s", type(e).__name__, e, said)
        return status
    finally:
        if not interrupted:
            faults.restore_interrupts()


class _Held:
    """``sys.stderr`` until the run starts: what Hydra writes there is kept, so that an error
    of its own (a traceback from creating a run folder in a file's place, say) can be said
    in one line; from ``release`` on, everything goes straight through."""

    def __init__(self, real):
        self.real, self.kept, self.held = real, [], True

    def write(self, text: str) -> int:
        if self.held:
            self.kept.append(text)
            return len(text)
        return self.real.write(text)

    def flush(self) -> None:
        if not self.held:
            self.real.flush()

    def release(self) -> None:
        if self.held:
            self.held = False
            self.real.write("".join(self.kept))

    def __getattr__(self, name):  # isatty, fileno, encoding: the real stream's
        return getattr(self.real, name)


def _one_line(kept: str) -> str:
    """Hydra's report of an error before the run starts: as it is, or, when it is a
    traceback, its last line (naming the run folder when it is one of a path's errors)."""
    lines = [ln for ln in kept.splitlines() if ln.strip() and "HYDRA_FULL_ERROR" not in ln]
    if "Traceback (most recent call last)" not in kept:
        return "\n".join(lines) + "\n"
    paths = ("NotADirectoryError", "PermissionError", "FileExistsError", "FileNotFoundError")
    hint = " (the run folder is runs_dir/run_name)" if lines[-1].startswith(paths) else ""
    return f"bad input: {lines[-1]}{hint}\n"


def main(run: Callable[[], None]) -> None:
    """``python -m iterate show RUN ...`` inspects a run folder (``iterate.report.show``);
    anything else runs the loop (``run``: the Hydra entry point of ``iterate.__main__``)."""
    import sys

    if sys.argv[1:2] == ["show"]:
        from iterate.report import show

        sys.exit(show.main(sys.argv[2:]))
    real = sys.stderr
    sys.stderr = held = _Held(real)
    try:
        run()
    except SystemExit as e:
        # Hydra reports its own errors (a misspelled key, an unknown choice, a value of the
        # wrong type, a run folder it cannot make) and exits 1 before the loop starts: bad
        # input, status 2
        if e.code == 1 and not STARTED:
            held.held = False
            real.write(_one_line("".join(held.kept)))
            sys.exit(2)
        raise
    finally:
        held.release()
        sys.stderr = real


STARTED = False  # set once Hydra composed the config and the run begins


def started() -> None:
    """The run begins: its exits are its own, and what was held of stderr goes out."""
    import sys

    global STARTED
    STARTED = True
    if isinstance(sys.stderr, _Held):
        sys.stderr.release()


class SweepSummary(Callback):
    """Hydra callback: after a multirun, print and write the jobs side by side; then name
    the jobs that stopped (failed or refused: the others ran on) and exit with the highest
    of their statuses."""

    def on_multirun_end(self, config, **kwargs) -> None:
        import sys

        from iterate.report.sweep import summarize_sweep

        sweep_dir = Path(config.hydra.sweep.dir)
        text = summarize_sweep(sweep_dir)
        if text:
            log.info("sweep summary (%s/summary.md, summary.png):\n%s", sweep_dir, text)
            print(text)
        if stopped := list(STOPPED_JOBS):
            STOPPED_JOBS.clear()
            for job, status in stopped:
                log.error(
                    "job %s stopped: %s (exit %d; `python -m iterate show %s` says why); %s",
                    job,
                    errors.WORDS[status],
                    status,
                    sweep_dir / job,
                    errors.resumes(status),
                )
            sys.exit(max(status for _, status in stopped))
