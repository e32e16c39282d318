"""Datasets: synthetic (TokFSM) and text."""
