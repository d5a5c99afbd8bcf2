"""Synthetic transcripts for the sample run and tests; nothing in the pipeline imports it."""
