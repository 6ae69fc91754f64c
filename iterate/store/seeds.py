"""Every seed in a run comes from here, derived from integers and a fixed purpose only:
(run seed, iteration, shard or step). No clock, no process id, no global state, so a stage
redone after a crash draws the same numbers as the uninterrupted run."""

from __future__ import annotations

import hashlib


def derive(purpose: str, *parts: int) -> int:
    """A 31-bit seed for ``purpose`` (``"generate"``, ``"rollout"``, ...) and integers."""
    key = ":".join([purpose, *(str(int(p)) for p in parts)])
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little") & 0x7FFFFFFF
