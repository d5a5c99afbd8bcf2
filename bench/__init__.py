"""Benchmarks (`make bench`, `make bench-scale`; see `bench/__main__.py`).

A bench that measures a part of a run in its own process (the export's or the library's memory)
must allocate as the `casemine` command does: Arrow's C++ code from the system pool, which the
command names before anything imports pyarrow (see `pipeline/cli/__init__.py`)."""

import os

os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
