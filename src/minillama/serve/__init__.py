"""Serving a checkpoint over HTTP: `app.py` the OpenAI-compatible API, `worker.py` the thread that drives the
inference engine, `protocol.py` the request and response shapes, `metrics.py` what /metrics reports."""
