"""Evaluation: held-out metrics per checkpoint. `metrics` is pure (training imports it); `run` drives models."""
