"""Crash injection for the resume tests: ``ITERATE_KILL_AT=<iteration>:<stage>:<n>``.

When set, the program SIGKILLs its whole process group (the engine's process and the main
program alike) right after the n-th unit of work (a shard, an optimiser step) of that
stage in that iteration. Unset, this does nothing.
"""

from __future__ import annotations

import os
import signal


def point(iteration: int, stage: str, n: int) -> None:
    if os.environ.get("ITERATE_KILL_AT") == f"{iteration}:{stage}:{n}":
        os.killpg(os.getpgid(0), signal.SIGKILL)
