"""Peak memory per run step, for the memory bench: with CASEMINE_MEMLOG=<file> the runner appends
one JSON line per step it finishes (step, the chunk's run id, the step's peak and end RSS in MiB,
and of that end RSS the anonymous memory and the pages of mapped files).

Why inside the run and why the kernel's high-water mark: a sampler outside the process misses
peaks shorter than its period and has to guess which step was running; VmHWM, reset when a step
starts (`/proc/self/clear_refs` 5, Linux >= 4.0), is the exact peak of that step. The reset also
clears the peak `wait4` would report for the process: with the log on, the run's peak is the
largest value logged. Off (one
environment lookup) unless the variable is set; on a system without `/proc` nothing is logged.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

_ENV = "CASEMINE_MEMLOG"
_FIELDS = re.compile(r"^(VmHWM|VmRSS|RssAnon|RssFile):\s+(\d+) kB", re.M)


def _status() -> dict[str, float] | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    return {k: int(v) / 1024 for k, v in _FIELDS.findall(text)}


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def step_started(step: str, chunk: str | None) -> None:
    """Log the peak since the last step ended (`start` the first time: imports and what ran
    before the first step; then `between`: the runner's own work between steps), then start a
    fresh peak for `step`. Resetting also resets what `getrusage`/`wait4` report as the
    process's peak, so the run's peak is the largest of these lines."""
    path = os.environ.get(_ENV)
    if not path:
        return
    _write(path, "between" if Path(path).exists() else "start", chunk)
    if not _reset_peak():
        _write(path, "no-reset", chunk)  # peaks below are then the process's, not the step's


def step_ended(step: str, chunk: str | None) -> None:
    """Log `step`'s peak since `step_started` and the RSS it leaves behind."""
    path = os.environ.get(_ENV)
    if path:
        _write(path, step, chunk)


def _write(path: str, step: str, chunk: str | None) -> None:
    st = _status()
    if st is None:
        return
    rec = {"step": step, "chunk": chunk, "peak_mib": round(st["VmHWM"], 1), "rss_mib": round(st["VmRSS"], 1)}
    # What RSS left behind is made of: memory the process holds (anonymous) or pages of files
    # it maps, which the kernel may drop. A growth of the one is a leak, of the other a mapping.
    for key, name in (("RssAnon", "anon_mib"), ("RssFile", "file_mib")):
        if key in st:
            rec[name] = round(st[key], 1)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")
