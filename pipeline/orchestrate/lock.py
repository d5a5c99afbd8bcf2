"""One writer per output root: an advisory lock held for the whole of a run.

Why `flock` on a file: the kernel drops the lock when its holder dies (SIGKILL, power loss of the
process), so a lock left by a killed run is never mistaken for a live one; the file's contents
only name the holder for the message. Without the lock, a second run on the same `--out` took
the first run's in-flight parts for orphans and deleted them, and two runs on one input stored
every case twice.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path


class LockHeld(RuntimeError):
    """Another live process holds the output root's lock; the message names it."""


_held: dict[str, tuple[int, int]] = {}  # lock path -> (fd, depth): re-entrant within a process
_guard = threading.Lock()


def lock_path(out: Path) -> Path:
    return out / "state" / "run.lock"


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return f"pid {info['pid']} on {info['host']} since {info['since']} ({info['command']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextmanager
def run_lock(out: Path, wait_s: float = 0.0, command: str = "casemine run") -> Iterator[None]:
    """Hold the output root's lock; LockHeld if another process keeps it longer than `wait_s`."""
    path = lock_path(out)
    key = str(path.resolve())
    with _guard:
        if key in _held:
            fd, depth = _held[key]
            _held[key] = (fd, depth + 1)
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield
        finally:
            _release(key)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise LockHeld(
                    f"{out} is in use by {_holder(path)}; wait for it to finish (or pass --wait SECONDS)"
                ) from None
            time.sleep(0.5)
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": command,
        "since": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    with _guard:
        _held[key] = (fd, 1)
    try:
        yield
    finally:
        _release(key)


def _release(key: str) -> None:
    with _guard:
        fd, depth = _held[key]
        if depth > 1:
            _held[key] = (fd, depth - 1)
            return
        del _held[key]
    os.ftruncate(fd, 0)
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
