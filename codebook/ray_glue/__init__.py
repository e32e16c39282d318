"""The Ray layer: everything in codebook that needs Ray, and nothing else does.

* ``session``: Ray for an entry point, started and stopped by one context manager;
* ``train``: Ray Train workers around the one training loop, MLflow run, resume (``fit``);
* ``data``: the training corpus as Ray Data (text, Parquet, Hugging Face; packing, batches);
* ``extract``: the code-extraction job as a Ray Data pipeline;
* ``evaluate``: the store evaluation's two passes (``codebook.store.eval_job``'s stages) in
  Ray Data actors, partials merged by one aggregation;
* ``labels``: automatic labels' counting in Ray Data actors, summed by a groupby;
* ``activations``: the comparison's activation cache written by Ray Data actors.

May import anything in ``codebook`` (core, training, analysis, compare, store); only the entry
points (``pipelines/``, ``tuning/``, ``benchmarks/``) import it. The rest of ``codebook``
imports without Ray installed (docs/architecture.md; tests/test_architecture.py checks it).
"""
