"""casemine: mine customer-service cases from Chinese chat logs and call transcripts.

Data flows one way: ingest -> normalize -> mask -> segment -> cases -> classify -> embed -> index
-> cluster -> export. Each step is a plain function over a batch; `pipeline.flows` wraps them in
Prefect tasks and `pipeline.cli` is the `casemine` command.
"""

__version__ = "0.1.0"
