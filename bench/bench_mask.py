"""Masking speed and over-masking: the current masker against a baseline version, in one run.

Speed: transcripts/s for masking both texts and the metadata of generated transcripts (the
`bench_pipeline` figure), for the baseline masker (pipeline/mask.py at `--baseline-rev`, loaded
from git) and the current one, measured alternately in the same process so the ratio is fair.

Over-masking (`--jddc FILE`): real chats whose personal data was replaced upstream ([姓名x]...),
so nearly every new mask there is a false one. Counts masks per kind for both maskers and prints
the name masks the current one adds, with their context, to be read by a person.

    python -m bench.bench_mask [--n 3000] [--baseline-rev 51056a7] [--jddc ../shared/data/jddc/dev.jsonl]
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any

from pipeline.config import load_config
from pipeline.ingest import discover, read_file
from pipeline.text.mask import Masker, map_foreign_placeholders
from pipeline.orchestrate.batch import mask_conversation, normalize_conversation
from pipeline.sample.generate import generate
from pipeline.text.prepare import get_masker, get_normalizer

REPO = Path(__file__).resolve().parents[1]
# The last commit before the masker learned names without cues and grouped numbers.
DEFAULT_BASELINE = "51056a7"


def _git_show(rev: str, path: str) -> str:
    return subprocess.run(["git", "show", f"{rev}:{path}"], cwd=REPO, check=True, capture_output=True, text=True).stdout


def load_baseline(rev: str) -> ModuleType:
    """The masker as it was at `rev` (pipeline/text/mask.py, or pipeline/mask.py before the
    packages by stage), imported under another name."""
    try:
        src = _git_show(rev, "pipeline/text/mask.py")
    except subprocess.CalledProcessError:
        src = _git_show(rev, "pipeline/mask.py")
    # Modules the old masker imports lazily, under the names they had before the packages by stage.
    for old, new in (("pipeline.normalize", "pipeline.text.normalize"), ("pipeline.segment", "pipeline.text.segment")):
        src = src.replace(f"from {old} import", f"from {new} import")
    path = Path(tempfile.mkdtemp()) / "mask_baseline.py"
    path.write_text(src, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("mask_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["mask_baseline"] = module
    spec.loader.exec_module(module)
    return module


def baseline_masker(module: ModuleType, cfg: Any, rev: str) -> Any:
    """The baseline with the surname list it shipped with."""
    m = cfg.mask
    path = Path(tempfile.mkdtemp()) / "surnames.txt"
    path.write_text(_git_show(rev, "configs/surnames.txt"), encoding="utf-8")
    return module.Masker(module.load_surnames(path), m.mask_order_ids, m.mask_addresses, m.mask_names)


def _rate(masker: Any, convs: list) -> float:
    t = time.perf_counter()
    for c in convs:
        mask_conversation(c, masker)
    return len(convs) / (time.perf_counter() - t)


def bench_speed(n: int, baseline: Any, current: Masker, rounds: int = 3) -> None:
    cfg = load_config()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "in"
        generate(root, n=n, seed=1, malformed=False)
        convs = [c for p in discover(root) for c in read_file(p, cfg.ingest, root).conversations]
    norm = get_normalizer(cfg)
    normed = [normalize_conversation(c, norm) for c in convs]
    mask_conversation(normed[0], baseline)  # warm caches (OpenCC, lexicon) outside the timing
    mask_conversation(normed[0], current)
    # Rounds alternate between the two so a busy neighbour on a shared machine slows both alike.
    old = new = 0.0
    for _ in range(rounds):
        old = max(old, _rate(baseline, normed))
        new = max(new, _rate(current, normed))
    print(f"masking both texts + metadata, {len(normed)} generated transcripts (best of {rounds}, alternating)")
    print(f"  baseline masker   {old:>9,.0f} transcripts/s")
    print(f"  current masker    {new:>9,.0f} transcripts/s   ({new / old:.2f}x)")


def _texts(path: Path) -> list[str]:
    """Turns of a chat JSONL, or the `review` (else `text`) column of a CSV, normalised."""
    norm = get_normalizer(load_config())
    raw: list[str] = []
    if path.suffix == ".csv":
        with open(path, encoding="utf-8-sig", newline="") as f:
            for row in csv.DictReader(f):
                raw.append(row.get("review") or row.get("text") or "")
    else:
        with open(path, encoding="utf-8") as f:
            for line in f:
                raw += [t.get("text") or "" for t in json.loads(line).get("turns", [])]
    return [norm.normalize(t) for t in raw]


def _context(text: str, s: Any) -> str:
    return f"{text[max(0, s.start - 12):s.start]}[{text[s.start:s.end]}]{text[s.end:s.end + 12]}"


def bench_jddc(path: Path, baseline: Any, current: Masker, show: int, seed: int = 0) -> None:
    texts = _texts(path)
    old_counts, new_counts = Counter(), Counter()
    added_names: list[tuple[str, str]] = []
    dropped: list[tuple[str, str]] = []
    for text in texts:
        text = map_foreign_placeholders(text)
        old_spans, new_spans = baseline.find(text), current.find(text)
        old_counts.update(s.kind for s in old_spans)
        new_counts.update(s.kind for s in new_spans)
        old_set = {(s.start, s.end) for s in old_spans}
        new_set = {(s.start, s.end) for s in new_spans}
        for s in new_spans:
            if s.kind == "name" and (s.start, s.end) not in old_set:
                added_names.append((text[s.start:s.end], _context(text, s)))
        for s in old_spans:
            if (s.start, s.end) not in new_set:
                dropped.append((s.kind, _context(text, s)))
    print(f"\nmasks on {len(texts)} real texts ({path.name})")
    print(f"  {'kind':<10} {'baseline':>9} {'current':>8} {'added':>6}")
    for kind in sorted(set(old_counts) | set(new_counts)):
        print(f"  {kind:<10} {old_counts[kind]:>9} {new_counts[kind]:>8} {new_counts[kind] - old_counts[kind]:>+6}")
    for kind, ctx in dropped:
        print(f"  baseline span not in current ({kind}): {ctx}")
    rng = random.Random(seed)
    picked = added_names if len(added_names) <= show else rng.sample(added_names, show)
    print(f"\n{len(added_names)} name masks added; {len(picked)} of them to read:")
    for value, ctx in picked:
        print(f"  {value:<6} {ctx}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=3000, help="generated transcripts for the speed figure")
    ap.add_argument("--baseline-rev", default=DEFAULT_BASELINE)
    ap.add_argument("--jddc", type=Path, action="append", default=[],
                    help="real text for the over-masking check: chat JSONL or a CSV with a review column (repeatable)")
    ap.add_argument("--show", type=int, default=30, help="added name masks to print")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    cfg = load_config()
    baseline = baseline_masker(load_baseline(args.baseline_rev), cfg, args.baseline_rev)
    current = get_masker(cfg)
    bench_speed(args.n, baseline, current, args.rounds)
    for path in args.jddc:
        bench_jddc(path, baseline, current, args.show)


if __name__ == "__main__":
    main()
