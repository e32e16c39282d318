"""The training loop, its configuration and engines (no Ray needed).

May import the core and ``codebook.analysis`` (the metrics the loop logs); never
``codebook.store``, ``codebook.ray_glue`` (which wraps this loop in Ray Train), Ray or the entry
points.
"""
