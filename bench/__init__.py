"""Benchmarks (`make bench`, `make bench-scale`; see `bench/__main__.py`).

A bench that measures a part of a run in its own process (the export's or the library's memory)
must allocate as the `casemine` command does: Arrow's C++ code from the system pool, named
before anything imports pyarrow."""

from pipeline.heap import name_system_arrow_pool

name_system_arrow_pool()
