"""Checks that a run can succeed, made before any work starts (and before Prefect starts).

Why up front: a read-only `--out` or a missing stop-word file used to surface as a traceback 40 s
into a run, after Prefect's server had started and the model had loaded. Each problem here is
one line that says what to do, with the exit code the CLI documents (1 input, 2 usage/config).
"""

from __future__ import annotations

import functools
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import Config


class PreflightError(RuntimeError):
    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Delivery:
    files: list[Path]  # every transcript file under the input
    new_files: int  # files no committed run has read as they are now (all of them for a new --out)


def check_input(input_dir: Path, allow_empty: bool) -> list[Path]:
    from pipeline.ingest import SUFFIXES, discover

    if not input_dir.exists():
        raise PreflightError(
            f"input {input_dir} does not exist; pass --input DIR (a folder of *.jsonl, *.json or "
            f"*.csv transcripts), or run `casemine sample --out {input_dir}` to make a sample"
        )
    files = discover(input_dir)
    if not files and not allow_empty:
        kinds = ", ".join(f"*{s}" for s in sorted(SUFFIXES))
        raise PreflightError(
            f"no transcripts ({kinds}) under {input_dir}: the delivery is empty; check the "
            "export job, or pass --allow-empty to accept a night without a delivery"
        )
    return files


def check_out(out: Path) -> None:
    """`out` is (or can be made) a folder this process can write into."""
    if out.exists() and not out.is_dir():
        raise PreflightError(f"--out {out} is a file, not a folder; pass a folder (it is created if missing)", code=2)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".casemine-write-check-"):
            pass
    except OSError as e:
        raise PreflightError(
            f"cannot write into --out {out} ({e.strerror or type(e).__name__}); pass a folder you can write to", code=2
        ) from None


def check_resources(cfg: Config) -> None:
    missing = {k: p for k, p in cfg.resource_files().items() if not p.is_file()}
    if missing:
        key, path = next(iter(missing.items()))
        more = f" (and {len(missing) - 1} more: {', '.join(list(missing)[1:])})" if len(missing) > 1 else ""
        raise PreflightError(
            f"{key} names {path}, which does not exist{more}; relative paths resolve against "
            f"{cfg.root} (see README, Configuration); fix the path or restore the file",
            code=2,
        )


def count_new_files(out: Path, input_dir: Path, files: list[Path]) -> int:
    """How many input files no committed run read as they are now (size, mtime, else checksum)."""
    from pipeline.ingest import input_name
    from pipeline.io import sha256_file
    from pipeline.storage.state import State, StateError

    if not (out / "state" / "state.sqlite").is_file():
        return len(files)
    try:
        state = State(out)
    except StateError as e:
        raise PreflightError(str(e)) from None
    try:
        new = 0
        for p in files:
            st = p.stat()
            if not state.file_unchanged(
                input_name(input_dir, p), st.st_size, st.st_mtime_ns, functools.partial(sha256_file, p)
            ):
                new += 1
        return new
    finally:
        state.close()


def check_run(cfg: Config, input_dir: Path, out: Path, allow_empty: bool = False) -> Delivery:
    """Everything `casemine run` needs, checked in the order a user would fix it."""
    check_resources(cfg)
    files = check_input(input_dir, allow_empty)
    check_out(out)
    return Delivery(files, count_new_files(out, input_dir, files))
