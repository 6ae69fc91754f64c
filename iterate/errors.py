"""What went wrong, as the command line reports it (``cli.exit_status``): ``BadInput`` is
input the user can fix (a setting, a path, a file's row, a run folder in use, changed or
damaged), raised on purpose with what to do, and exits with status 2. Any other exception
is a failure (status 1): an internal ``ValueError`` is a bug to report, not bad input.
Ctrl-C stops with 130, SIGTERM (a scheduler's or ``kill``'s) with 143; a rerun of the same
command resumes after 1, 130 and 143, and after 2 once the input is fixed."""

from __future__ import annotations


class BadInput(ValueError):
    """Input the user can fix: a setting, a path, a file's row. Exit status 2."""


class Terminated(KeyboardInterrupt):
    """SIGTERM: stops the run where it is, as Ctrl-C does (``faults.catch_interrupts``)."""


# BadInput (a changed or damaged stage included), a path that is not there or not a folder,
# and a file the run may not write; any other exception, an internal ValueError included, is
# a failure
BAD_INPUT = (BadInput, FileNotFoundError, NotADirectoryError, PermissionError)

WORDS = {2: "bad input", 1: "failed", 130: "interrupted (Ctrl-C)", 143: "terminated (SIGTERM)"}


def status_of(e: BaseException) -> int:
    """The exit status an exception stops a run with."""
    if isinstance(e, Terminated):
        return 143
    if isinstance(e, KeyboardInterrupt):
        return 130
    return 2 if isinstance(e, BAD_INPUT) else 1


def resumes(status: int) -> str:
    """What a rerun of the same command does after a stop with ``status``."""
    if status == 2:
        return "the same command stops the same way until the input is fixed, then resumes"
    return "the same command resumes where this stopped"
