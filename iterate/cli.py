"""What the command line prints and returns when a run ends early: one line saying what
went wrong and where, the traceback in the run's log file only, and an exit status a
script can act on: 2 bad input (a setting, a path, a file's row, a run folder in use or
changed; Hydra's own composition errors too), 1 a failure, 130 Ctrl-C. A rerun of the same
command resumes after 1 and 130."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable

from iterate.errors import BadInput

log = logging.getLogger("iterate")

# BadInput (a changed or damaged stage included), and a path that is not there; any other
# exception, an internal ValueError included, is a failure
BAD_INPUT = (BadInput, FileNotFoundError, NotADirectoryError)


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


def exit_status(fn: Callable[[], object]) -> int:
    """Run ``fn``; 0 when it returns, else the status above, having said why in one line."""
    from iterate import faults

    faults.catch_interrupts()
    try:
        fn()
        faults.stop_if_interrupted()  # a Ctrl-C swallowed after the last stage boundary
        return 0
    except KeyboardInterrupt:
        faults.ignore_interrupts()
        log.error("interrupted (Ctrl-C): the same command resumes where this stopped")
        return 130
    except BAD_INPUT as e:
        where = _to_log_file(traceback.format_exc())
        log.error("bad input: %s", e)
        log.debug("traceback in %s", where)
        return 2
    except Exception as e:  # a failure: say what and where the traceback is
        where = _to_log_file(traceback.format_exc())
        log.error(
            "failed: %s: %s%s",
            type(e).__name__,
            e,
            f" (traceback in {where}; the same command resumes)" if where else "",
        )
        return 1


def main(run=None) -> None:
    """``python -m iterate`` and the ``iterate`` console script: ``show RUN ...`` inspects a
    run folder (``iterate.report.show``); anything else runs the loop (``run``: the Hydra
    entry point of ``iterate.__main__``)."""
    import sys

    if sys.argv[1:2] == ["show"]:
        from iterate.report import show

        sys.exit(show.main(sys.argv[2:]))
    if run is None:
        from iterate.__main__ import main as run
    try:
        run()
    except SystemExit as e:
        # Hydra reports its own errors (a misspelled key, an unknown choice, a value of the
        # wrong type) and exits 1 before the loop starts: bad input, status 2
        if e.code == 1 and not STARTED:
            sys.exit(2)
        raise


STARTED = False  # set once Hydra composed the config and the run begins
