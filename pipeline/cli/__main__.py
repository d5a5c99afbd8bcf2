"""`python -m pipeline.cli` runs the `casemine` command (used where the console script is not on PATH)."""

from pipeline.cli import main

main()
