"""members_view and recount_clusters inside a real incremental export, first in process and warm.

Why: issue 15; these two were the largest history-bound functions of a night's export (~77 and
~86 ms CPU at 100k cases). The export runs once on a fresh copy of a kept night (`bench.bench_export
--keep DIR`) with both functions timed in place (the first call in the process); then both are
called again `--repeat` times on the arguments they were given, each repeat on a fresh members
table, so that the members' column codes are counted as a night counts them. The code on
PYTHONPATH is measured, so the same file times an older checkout (A/B):

    PYTHONPATH=. python bench/bench_members.py DIR/night1000 [--repeat 4]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("night", help="a kept night")
    ap.add_argument("--repeat", type=int, default=4, help="warm calls after the export")
    args = ap.parse_args()

    from pipeline.config import load_config
    from pipeline.embed import Embedder
    from pipeline.insights import export as ex

    cfg = load_config(Path(ex.__file__).resolve().parents[1].parent / "configs" / "casemine.yaml")
    seen: dict[str, Any] = {}
    view, recount = ex.members_view, ex.recount_clusters

    def timed(name: str, fn: Any) -> Any:
        def call(*a: Any, **k: Any) -> Any:
            t = time.process_time()
            out = fn(*a, **k)
            seen.setdefault(name, time.process_time() - t)
            seen[f"{name}_args"] = (a, k)
            return out

        return call

    ex.members_view, ex.recount_clusters = timed("mv", view), timed("rc", recount)  # type: ignore[assignment]
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        out = Path(tmp) / "n"
        shutil.copytree(args.night, out)
        Embedder(cfg, out_root=out).encode_passages(["预热"])
        t = time.perf_counter()
        r = ex.export_all(cfg, out, today=date(2025, 12, 1))
        total = time.perf_counter() - t
        (va, vk), (ra, rk) = seen["mv_args"], seen["rc_args"]
        warm_mv, warm_rc = [], []
        for _ in range(args.repeat):
            t = time.process_time()
            members = view(*va, **vk)
            warm_mv.append(time.process_time() - t)
            t = time.process_time()
            recount(ra[0], members, *ra[2:], **rk)
            warm_rc.append(time.process_time() - t)

    def span(xs: list[float]) -> str:
        return f"{min(xs) * 1000:.0f}-{max(xs) * 1000:.0f} ms"

    print(
        f"{Path(args.night).name} {r['mode']}: export {total:.2f} s wall; first in process: members_view "
        f"{seen['mv'] * 1000:.0f} ms, recount_clusters {seen['rc'] * 1000:.0f} ms; warm: members_view "
        f"{span(warm_mv)}, recount_clusters {span(warm_rc)} (CPU)"
    )


if __name__ == "__main__":
    main()
