"""Codebooks against TopK sparse autoencoders (EleutherAI's sparsify) and neurons on the same
model, sites, data and sparsity: an activation cache (``cache``), the methods as codebook
models (``methods``, ``sparse_coder``), one scoring code for all (``score``, ``text``), and
the whole run (``runner``). ``pipelines/compare.py`` is the command line; it hands
``runner.run`` the Ray parts (the cache collected by ``codebook.ray_glue.activations``, Ray
Train's ``fit``).

On the training and analysis floor: may import the core, ``codebook.training``,
``codebook.analysis`` and ``codebook.steering``; never ``codebook.store``, ``codebook.ray_glue``,
Ray or the entry points."""
