"""Training: run configs, the optimizer and schedule, distributed set-up, checkpoints, metrics, and the loop."""
