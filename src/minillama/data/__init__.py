"""Data: sources of documents -> token shards (prepare) -> batches for training and validation (loader)."""
