"""Crash injection for the resume tests, and Ctrl-C that is never lost.

``ITERATE_KILL_AT=<iteration>:<stage>:<n>``:
When set, the program SIGKILLs its whole process group (the engine's process and the main
program alike) right after the n-th unit of work (a shard, an optimiser step) of that
stage in that iteration. Unset, this does nothing. The ranks of a multi-process update run
in sessions of their own, so they kill the loop's group, which ``ITERATE_PGID`` names.

A Ctrl-C raises ``KeyboardInterrupt`` where the program is, unless that is a finalizer
(``__del__``), where Python prints "Exception ignored" and goes on. ``catch_interrupts``
also records it, and every stage boundary (``Stage.check`` and ``Stage.finish``) calls
``stop_if_interrupted``, so the run stops there at the latest.
"""

from __future__ import annotations

import os
import signal
import threading

_INTERRUPTED = threading.Event()


def point(iteration: int, stage: str, n: int) -> None:
    if os.environ.get("ITERATE_KILL_AT") == f"{iteration}:{stage}:{n}":
        os.killpg(int(os.environ.get("ITERATE_PGID", os.getpgid(0))), signal.SIGKILL)


def _on_sigint(signum, frame) -> None:
    _INTERRUPTED.set()
    raise KeyboardInterrupt


def catch_interrupts() -> None:
    """Ctrl-C (SIGINT) raises KeyboardInterrupt and is remembered (main thread only)."""
    _INTERRUPTED.clear()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_sigint)


def ignore_interrupts() -> None:
    """The run is stopping on a Ctrl-C: a further one (a second press, or one still on its
    way) would only turn the clean stop into an uncaught KeyboardInterrupt while it is
    reported, so SIGINT is ignored from here on (main thread only)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def stop_if_interrupted() -> None:
    """Raise KeyboardInterrupt if a Ctrl-C came and was swallowed on its way."""
    if _INTERRUPTED.is_set():
        raise KeyboardInterrupt
