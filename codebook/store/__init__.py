"""The code store and everything that reads it.

Holds: the store's format and writer (``format``: re-exported here, so ``from codebook.store
import CodeStore`` works), extraction into a store without Ray (``extract``), DuckDB queries
(``query``), search (``search``), the evaluation of codes and neurons as feature classifiers
(``evaluate``: the per-shard passes; ``heldout``: the held-out split, choice and null;
``eval_job``: one checked run of both passes), code pages (``code_page``), automatic labels
(``label_counts``, ``autolabel``) and export (``export``).

May import the core (``codebook.*`` modules, ``codebook.data``) and model-side measurement
(``codebook.analysis``); never ``codebook.ray_glue``, Ray, or the entry points
(docs/architecture.md; tests/test_architecture.py checks it).
"""

from codebook.sites import SiteInfo
from codebook.store.format import (
    CODE_STATS_FILE,
    META_FILE,
    SCHEMA_KEY,
    STATS_DIR,
    STORE_VERSION,
    TOKENS_DIR,
    CodeStore,
    StoreMeta,
    acts_column,
    code_dtype,
    code_stats_table,
    codes_column,
    fixed_list,
    list_to_numpy,
    read_token_file,
    scores_column,
    shard_name,
    token_table,
    write_parquet_atomic,
)

__all__ = ["CODE_STATS_FILE", "META_FILE", "SCHEMA_KEY", "STATS_DIR", "STORE_VERSION",
           "TOKENS_DIR", "CodeStore", "SiteInfo", "StoreMeta", "acts_column", "code_dtype",
           "code_stats_table", "codes_column", "fixed_list", "list_to_numpy", "read_token_file",
           "scores_column", "shard_name", "token_table", "write_parquet_atomic"]
