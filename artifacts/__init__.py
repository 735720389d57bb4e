"""The artifact store: content, manifests, refs, locks, the ledger and the DuckDB catalog. No torch."""
