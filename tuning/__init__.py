"""Hyperparameter sweeps: Ray Tune over the one training loop, every trial in MLflow."""
