"""indexer: consumes ``instance.stored`` and writes patient / study / series / instance rows."""
