"""Crash injection for the resume tests: ``ITERATE_KILL_AT=<iteration>:<stage>:<n>``.

When set, the program SIGKILLs its whole process group (the engine's process and the main
program alike) right after the n-th unit of work (a shard, an optimiser step) of that
stage in that iteration. Unset, this does nothing. The ranks of a multi-process update run
in sessions of their own, so they kill the loop's group, which ``ITERATE_PGID`` names.
"""

from __future__ import annotations

import os
import signal


def point(iteration: int, stage: str, n: int) -> None:
    if os.environ.get("ITERATE_KILL_AT") == f"{iteration}:{stage}:{n}":
        os.killpg(int(os.environ.get("ITERATE_PGID", os.getpgid(0))), signal.SIGKILL)
