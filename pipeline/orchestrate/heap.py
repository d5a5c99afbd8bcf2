"""The run steps' heap trim, now in `pipeline.heap` (the export, a lower layer, trims too)."""

from __future__ import annotations

from pipeline.heap import release_free_heap

__all__ = ["release_free_heap"]
