"""One writer per run folder: the folder itself is held with ``flock`` for the whole run.

The kernel drops the lock when its holder dies, however it dies, so a lock is never stale
in fact. The folder, not a file in it, is what is locked: a lock file can be deleted under a
live run, and the next process would lock a new one and write the same stages. The file
``<run>/.lock`` only names the last holder (pid, host, start time), which the next process
reports (taking over from a dead holder is logged; a live one is named in the refusal). On
a file system that cannot lock a folder (NFS emulates ``flock`` with POSIX locks, which a
folder opened read-only cannot take), the file is locked instead.
Also cleans what dead writers left: temporary files and folders (``*.tmp<pid>``) of
processes no longer running, which only the lock holder may do safely.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from iterate import workers
from iterate.errors import BadInput
from iterate.store.shards import clean_temporaries, read_json

log = logging.getLogger(__name__)


class RunLocked(BadInput):
    """Another process holds the run folder."""


def _take(folder: int, file: int) -> int:
    """Lock the folder, or the file where the file system cannot lock a folder; returns
    the one locked (the other is closed), or raises ``BlockingIOError`` when it is held."""
    try:
        fcntl.flock(folder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return folder
    except OSError as e:
        os.close(folder)
        if isinstance(e, BlockingIOError):
            raise
    fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return file


class RunLock:
    def __init__(self, run: Path):
        self.run = Path(run)
        self.path = self.run / ".lock"  # names the holder
        self.fd: int | None = None  # what is locked: the folder (or, where it can't be, the file)
        self.info: int | None = None  # the holder file

    def __enter__(self) -> RunLock:
        self.run.mkdir(parents=True, exist_ok=True)
        try:
            info = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:  # a folder in its place, a file this user cannot write
            raise BadInput(
                f"{self.path}: the run's lock file cannot be opened ({e.strerror}): "
                "remove it, or use another run_name"
            ) from None
        try:
            fd = _take(os.open(self.run, os.O_RDONLY | os.O_DIRECTORY), info)
        except BlockingIOError:
            holder = self._holder(info)
            os.close(info)
            who = (
                f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}"
                if holder
                else "another process"
            )
            raise RunLocked(
                f"{self.run}: in use by {who}; wait for it to finish, stop it, or "
                "use another run_name"
            ) from None
        old = self._holder(info)
        if old and old.get("pid") != os.getpid():
            log.warning(
                "%s: taking over the lock of pid %s on %s (since %s), which is no longer running",
                self.run,
                old.get("pid"),
                old.get("host"),
                old.get("since"),
            )
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%F %T")}
        os.ftruncate(info, 0)
        os.pwrite(info, json.dumps(me).encode(), 0)
        self.fd, self.info = fd, info
        clean_temporaries(self.run)
        return self

    @staticmethod
    def _holder(fd: int) -> dict:
        try:
            return json.loads(os.pread(fd, 4096, 0) or b"{}")
        except ValueError:
            return {}

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.ftruncate(self.info, 0)  # a clean exit leaves no holder to report
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            if self.info != self.fd:
                os.close(self.info)
            self.fd = self.info = None


def holder(run: Path) -> dict | None:
    """Who holds the run folder now, read without taking the lock (the run inspector): the
    holder the lock file names, if its process still runs (on another host: as named)."""
    try:
        who = read_json(Path(run) / ".lock") or {}
    except (OSError, BadInput):  # unreadable, or empty while its holder writes it
        return None
    if not who.get("pid"):
        return None
    if who.get("host") == socket.gethostname() and not workers.alive(int(who["pid"])):
        return None  # killed: the kernel dropped its lock, the file still names it
    return who
