"""Progress bars: shown on a terminal, quiet in logs (CI, redirected output)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

_QUIET = False  # ranks other than 0 of a multi-process update show no bars


def disable() -> None:
    global _QUIET
    _QUIET = True


def bar(total: int | None = None, desc: str = "", unit: str = "it", **kw) -> tqdm:
    return tqdm(
        total=total, desc=desc, unit=unit, disable=True if _QUIET else None, mininterval=0.5,
        leave=False, **kw,
    )  # fmt: skip


def peak_rss_mb() -> float:
    """This process's peak resident memory since it started or since ``reset_peak_rss``,
    in MB (a per-process high-water mark)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Start the high-water mark of ``peak_rss_mb`` again from the memory held now (Linux:
    ``/proc/self/clear_refs``), so one process can measure several pieces of work; False
    where the system cannot (the mark then goes on from its old peak)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class Timer:
    """Wall-clock seconds per named section: ``with timer("merge"): ...``, then
    ``timer.seconds``. Stages record them in ``_DONE.json`` (``timings``), which is where
    the benchmark's iteration breakdown reads its fixed overheads from."""

    def __init__(self, seconds: dict[str, float] | None = None):
        self.seconds: dict[str, float] = {} if seconds is None else seconds  # adds to a given dict

    @contextmanager
    def __call__(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - t, 3)
