"""Inference: turning a model's next-token distributions into text for `generate`, evaluation and the server."""
