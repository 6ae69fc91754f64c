"""Crash injection for the resume tests, and Ctrl-C that is never lost.

``ITERATE_KILL_AT=<iteration>:<stage>:<n>``:
When set, the program SIGKILLs its whole process group (the engine's process and the main
program alike) right after the n-th unit of work (a shard, an optimiser step) of that
stage in that iteration. Unset, this does nothing. The ranks of a multi-process update run
in sessions of their own, so they kill the loop's group, which ``ITERATE_PGID`` names.

A Ctrl-C raises ``KeyboardInterrupt`` where the program is, unless that is a finalizer
(``__del__``), where Python prints "Exception ignored" and goes on. ``catch_interrupts``
also records it, and every stage boundary (``Stage.check`` and ``Stage.finish``) calls
``stop_if_interrupted``, so the run stops there at the latest. SIGTERM (what ``kill`` and
batch schedulers send before SIGKILL) does the same, raising ``errors.Terminated``: the run
stops as on Ctrl-C, says so, and records where it stopped.

``ITERATE_KILL_AT=<iteration>:<stage>:<n>:TERM`` sends SIGTERM to the group instead.
"""

from __future__ import annotations

import os
import signal
import threading

from iterate.errors import Terminated

_INTERRUPTED = threading.Event()
_RAISES: list[type[KeyboardInterrupt]] = [KeyboardInterrupt]  # what the last signal raised
_PREVIOUS: dict = {}  # the handlers before catch_interrupts, for restore_interrupts
STOPS = (signal.SIGINT, signal.SIGTERM)


def point(iteration: int, stage: str, n: int) -> None:
    at = os.environ.get("ITERATE_KILL_AT", "")
    if at.removesuffix(":TERM") == f"{iteration}:{stage}:{n}":
        sig = signal.SIGTERM if at.endswith(":TERM") else signal.SIGKILL
        os.killpg(int(os.environ.get("ITERATE_PGID", os.getpgid(0))), sig)


def _on_signal(signum, frame) -> None:
    _RAISES[0] = Terminated if signum == signal.SIGTERM else KeyboardInterrupt
    _INTERRUPTED.set()
    raise _RAISES[0]


def catch_interrupts() -> None:
    """Ctrl-C (SIGINT) raises KeyboardInterrupt, SIGTERM ``Terminated``, and either is
    remembered (main thread only)."""
    _INTERRUPTED.clear()
    if threading.current_thread() is threading.main_thread():
        for sig in STOPS:
            _PREVIOUS.setdefault(sig, signal.signal(sig, _on_signal))


def restore_interrupts() -> None:
    """The handlers as they were before ``catch_interrupts`` (main thread only)."""
    if threading.current_thread() is threading.main_thread():
        for sig, handler in list(_PREVIOUS.items()):
            signal.signal(sig, handler)
            del _PREVIOUS[sig]


def ignore_interrupts() -> None:
    """The run is stopping on a Ctrl-C or SIGTERM: a further one (a second press, or one
    still on its way) would only turn the clean stop into an uncaught exception while it is
    reported, so both are ignored from here on (main thread only)."""
    if threading.current_thread() is threading.main_thread():
        for sig in STOPS:
            signal.signal(sig, signal.SIG_IGN)


def stop_if_interrupted() -> None:
    """Raise what the signal raises if a Ctrl-C or SIGTERM came and was swallowed on its
    way."""
    if _INTERRUPTED.is_set():
        raise _RAISES[0]
