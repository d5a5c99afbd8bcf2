"""What a run leaves on disk: the Parquet case table, quarantine and summaries (store), and the
state database with its per-run manifests (state)."""
