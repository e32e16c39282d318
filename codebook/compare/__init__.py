"""Codebooks against TopK sparse autoencoders (EleutherAI's sparsify) and neurons on the same
model, sites, data and sparsity: an activation cache (``cache``), the methods as codebook
models (``methods``, ``sparse_coder``), and one scoring code for all (``score``).
``pipelines/compare.py`` is the command line; the cache is collected by
``codebook.ray_glue.activations``."""
