"""Training stage: the loop, checkpoints, metrics. Knows about steps and processes; the model does not."""
