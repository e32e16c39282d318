"""The Ray layer: everything in codebook that needs Ray, and nothing else does.

* ``session``: Ray for an entry point, started and stopped by one context manager;
* ``train``: Ray Train workers around the one training loop, MLflow run, resume (``fit``);
* ``data``: the training corpus as Ray Data (text, Parquet, Hugging Face; packing, batches);
* ``extract``: the code-extraction job as a Ray Data pipeline.

The rest of ``codebook`` imports without Ray installed.
"""
