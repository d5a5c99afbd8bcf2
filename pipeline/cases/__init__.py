"""Conversations into case records: problem, handling, outcome with its evidence, timings."""
