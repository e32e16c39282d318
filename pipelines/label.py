"""Label every code of a code store automatically, with Ray Data (writes <store>/labels.parquet).

    python pipelines/label.py --store stores/shakespeare [--features my_features.yaml]

A code's label is the best of its candidates (its most frequent firing tokens, token bigrams
ending at the firing token, and the regex feature library), chosen by F1 on the selection half of
the store's documents and scored (precision, recall) on the test half
(``codebook.store.autolabel``). Shards are counted in Ray Data actors and summed by a groupby,
so the store is never held in memory (``codebook.ray_glue.labels``). The browser shows the labels
on code pages and in search results. The last line printed is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from codebook.errors import ConfigError  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", required=True)
    p.add_argument("--features", help="a regex features YAML file (added to the library's)")
    p.add_argument("--sites", nargs="*", help="sites to label (default: all)")
    p.add_argument("--top-candidates", type=int, default=5,
                   help="frequent tokens and bigrams tried per code")
    p.add_argument("--min-count", type=int, default=2,
                   help="selection-half tokens a candidate must share with the code")
    p.add_argument("--seed", type=int, default=0, help="the document split's seed")
    p.add_argument("--num-workers", type=int, default=1, help="counting actors")
    args = p.parse_args(argv)
    from codebook.analysis.features import load_features
    from codebook.ray_glue.labels import count_rows
    from codebook.ray_glue.session import ray_session
    from codebook.store import CodeStore
    from codebook.store.autolabel import finish_labels, prepare_labels

    try:
        if args.num_workers < 1:
            raise ConfigError("--num-workers", f"must be >= 1, got {args.num_workers}", "e.g. 1")
        store = CodeStore(args.store)
        if not store.complete:
            raise ConfigError("--store", f"{store.root} has {len(store.done_shards())} of "
                              f"{store.meta.num_shards} shards", "finish pipelines/extract.py")
        job = prepare_labels(store, load_features(args.features), args.sites, args.seed,
                             top_candidates=args.top_candidates, min_count=args.min_count)
    except (ConfigError, ValueError) as err:  # every check before Ray starts
        sys.exit(f"config error: {err}")
    t0 = time.perf_counter()
    with ray_session():
        counts = count_rows(store, job, num_workers=args.num_workers)
    table = finish_labels(job, counts)
    kinds = table.column("kind").to_pylist()
    summary = {"store": str(store.root), "labels": table.num_rows,
               "by_kind": {k: kinds.count(k) for k in sorted(set(kinds))},
               "file": str(store.root / "labels.parquet"),
               "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
