"""Progress: a bar on a terminal; where there is none (a log file, CI, a job scheduler's
output), log lines with the rate and the time left, so a long stage is never silent."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger(__name__)
_QUIET = False  # ranks other than 0 of a multi-process update show no bars


def disable() -> None:
    global _QUIET
    _QUIET = True


def bar(total: int | None = None, desc: str = "", unit: str = "it", **kw):
    """A progress bar (``update``, ``set_postfix``, ``close``): tqdm's on a terminal, else
    ``Lines``."""
    if _QUIET or sys.stderr.isatty():
        return tqdm(
            total=total, desc=desc, unit=unit, disable=_QUIET, mininterval=0.5, leave=False, **kw
        )
    return Lines(total, desc, unit)


def _duration(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Lines:
    """Progress as log lines where no bar can be drawn: quiet for the first ``quiet_s``
    seconds (short work says nothing), then a line each time another ``share`` of the
    total is done (at most one every ``min_s``) or ``every_s`` passed, with the count, the
    rate and the time left; a last line at the end of work that spoke. Thread-safe (worker
    threads update one bar)."""

    def __init__(
        self,
        total: int | None,
        desc: str,
        unit: str,
        quiet_s: float = 10.0,
        share: float = 0.1,
        min_s: float = 5.0,
        every_s: float = 60.0,
    ):
        self.total, self.desc, self.unit, self.n = total, desc, unit, 0
        self.quiet_s, self.share, self.min_s, self.every_s = quiet_s, share, min_s, every_s
        self.t0 = self.last = time.monotonic()
        self.at, self.spoke, self.postfix = 0, False, ""
        self.lock = threading.Lock()

    def set_postfix(self, **kw) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in kw.items())

    def update(self, n: int = 1) -> None:
        with self.lock:
            self.n += n
            now = time.monotonic()
            if now - self.t0 < self.quiet_s or now - self.last < self.min_s:
                return
            step = self.total and self.n - self.at >= self.share * self.total
            if step or now - self.last >= self.every_s:
                self._say(now)

    def _say(self, now: float) -> None:
        took = now - self.t0
        rate = self.n / took if took > 0 else 0.0
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        left = ""
        if self.total and rate > 0 and self.n < self.total:
            left = f", {_duration((self.total - self.n) / rate)} left"
        more = f", {self.postfix}" if self.postfix else ""
        log.info(
            "%s: %s %s%s, %.3g %s/s, %s in%s%s",
            self.desc,
            done,
            self.unit,
            pct,
            rate,
            self.unit,
            _duration(took),
            left,
            more,
        )
        self.at, self.last, self.spoke = self.n, now, True

    def close(self) -> None:
        with self.lock:
            if self.spoke and self.n != self.at:
                self._say(time.monotonic())


class Overdue(TimeoutError):
    """Raised in work that ran past ``watch``'s limit."""


_OVERDUE = signal.SIGUSR2  # what interrupts overdue work (not SIGALRM: user code sets alarms)


@contextmanager
def watch(what: str, timeout_s: float = 0.0, every_s: float = 30.0):
    """Work that may block (a user's function): a line every ``every_s`` seconds it runs on,
    naming ``what``; past ``timeout_s`` (0: no limit) ``Overdue`` is raised in it where it
    runs in the main thread (a signal, so a blocking call is interrupted too; in another
    thread it gets the lines only)."""
    done, t0 = threading.Event(), time.monotonic()
    limit = timeout_s > 0 and threading.current_thread() is threading.main_thread()

    def overdue(signum, frame):
        if not done.is_set():  # (a signal that crossed the work's end is ignored)
            raise Overdue(f"{what}: still running after {_duration(timeout_s)}")

    def lines():
        while True:
            left = t0 + timeout_s - time.monotonic() if limit else every_s
            if done.wait(max(0.0, min(every_s, left))):
                return
            if limit and time.monotonic() - t0 >= timeout_s:
                signal.pthread_kill(threading.main_thread().ident, _OVERDUE)
                return
            log.info("%s: still running after %s", what, _duration(time.monotonic() - t0))

    previous = signal.signal(_OVERDUE, overdue) if limit else None
    thread = threading.Thread(target=lines, name="watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        if limit:
            signal.signal(_OVERDUE, previous)


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


def _cuda():
    """torch's CUDA module when this process has put work on a CUDA device, else None
    (without importing torch where nothing has)."""
    torch = sys.modules.get("torch")
    return torch.cuda if torch is not None and torch.cuda.is_initialized() else None


def peak_gpu_mb() -> float | None:
    """The CUDA allocator's peak in MB (every device of this process) since it started or
    since ``reset_peak_gpu``; None when this process has used no CUDA device."""
    cuda = _cuda()
    if cuda is None:
        return None
    return sum(cuda.max_memory_allocated(d) for d in range(cuda.device_count())) / 2**20


def reset_peak_gpu() -> None:
    if (cuda := _cuda()) is not None:
        for d in range(cuda.device_count()):
            cuda.reset_peak_memory_stats(d)


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
