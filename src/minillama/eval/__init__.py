"""Evaluation: HellaSwag, validation loss, and the curves and report of a run."""
