"""Serving a checkpoint over HTTP: `batcher.py` runs batched decoding, `app.py` the OpenAI-compatible API."""
