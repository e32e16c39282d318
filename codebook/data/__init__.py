"""Datasets: synthetic (TokFSM) and text.

Part of the core: may import the other core modules (``codebook.errors``, ``codebook.io``,
...) and no higher floor (training, analysis, store, ray_glue, entry points).
"""
