"""casemine: mine customer-service cases from Chinese chat logs and call transcripts.

The packages follow the data, which flows one way; a package imports only the ones above it in
this list (checked by import-linter, `make lint`):

    config, schema, io, progress,  the shared core: validated config, record shapes, atomic writes,
    labelled                       progress, reading labelled tables
    embed                          sentence encoders (offline default), shared by analysis and retrieval
    storage                        the case table on disk, the run state and its manifests
    ingest                         decode, parse and validate deliveries
    text                           normalise, mask, segment (the one tokenize)
    cases                          conversations -> case records (problem, handling, outcome, timings)
    analysis                       emotion per turn and per case; issue type, request kind, urgency
    retrieval                      FAISS index, BM25, hybrid search
    insights                       root-cause clusters, trends, KPIs, the report and exports
    library                        the typical-case library and its review workflow
    query                          the agents' query client and the warm query server
    orchestrate                    the declared steps, the plain and Prefect runners, locks, pre-flight
    evaluate                       quality on labelled real data
    cli                            the `casemine` command
    sample                         the synthetic transcript generator (stands alone)
"""

__version__ = "0.1.0"
