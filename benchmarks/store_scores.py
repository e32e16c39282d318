"""What storing each firing's similarity score costs: bytes per token of a code store shard with
and without the ``scores.<site>`` columns (zstd Parquet, as ``pipelines/extract.py`` writes).

    python benchmarks/store_scores.py --model RUN/checkpoint_x/hf --source fsm \\
        --fsm-file RUN/analysis/fsm.json --documents 512
    python benchmarks/store_scores.py --model RUN/checkpoint_x/hf --source text \\
        --paths data/text/shakespeare data/text/enwiki --documents 64

The same model pass gives both tables (the scores are recorded anyway); only the files differ.
Prints one line per run and a JSON summary last; the ratio is what the extraction default is
decided on (on when it is <= 1.25).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from codebook.corpus import Corpus, describe_corpus  # noqa: E402
from codebook.data.text import load_tokenizer  # noqa: E402
from codebook.extraction import extract_windows, shard_windows  # noqa: E402
from codebook.resolve import load_trained_model, site_infos  # noqa: E402
from codebook.store import StoreMeta, token_table, write_parquet_atomic  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--source", choices=["fsm", "text"], required=True)
    p.add_argument("--fsm-file")
    p.add_argument("--paths", nargs="*", default=[])
    p.add_argument("--documents", type=int, default=256)
    p.add_argument("--block-size", type=int, default=256)
    args = p.parse_args()
    source = describe_corpus(Corpus(source=args.source, paths=args.paths,
                                    fsm_file=args.fsm_file, fsm_sequences=args.documents))
    n_docs = min(args.documents, source["num_documents"])
    model = load_trained_model(args.model)
    infos = site_infos(args.model)
    sites = list(infos)
    tokenizer = None if args.source == "fsm" else load_tokenizer(args.model)
    block = args.block_size
    if args.source == "fsm":
        from codebook.data.fsm import TokFSM

        block = TokFSM.from_dict(source["fsm"]).seq_len
    windows = shard_windows(source, {"start": 0, "stop": n_docs}, tokenizer, block)
    t0 = time.perf_counter()
    res = extract_windows(model, windows, sites, [], score_sites=sites)
    seconds = time.perf_counter() - t0
    tokens = len(res["doc_id"])
    sizes = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, score_sites in (("codes", []), ("codes+scores", sites)):
            meta = StoreMeta(model=args.model, tokenizer=None, source=source,
                             sites={s: infos[s] for s in sites}, score_sites=score_sites)
            table = token_table(res["doc_id"], res["position"], res["token_id"], res["codes"],
                                meta, scores=res["scores"])
            path = Path(tmp) / f"{name}.parquet"
            write_parquet_atomic(table, path)
            sizes[name] = path.stat().st_size
            print(f"{name:13s} {sizes[name] / tokens:7.2f} bytes/token ({tokens} tokens)",
                  flush=True)
    widths = {s: infos[s].groups * infos[s].k for s in sites}
    summary = {"model": args.model, "source": args.source, "tokens": tokens,
               "sites": len(sites), "codes_per_token": sum(widths.values()),
               "bytes_per_token_codes": round(sizes["codes"] / tokens, 3),
               "bytes_per_token_with_scores": round(sizes["codes+scores"] / tokens, 3),
               "ratio": round(sizes["codes+scores"] / sizes["codes"], 3),
               "extract_seconds": round(seconds, 1)}
    print(f"scores cost x{summary['ratio']} bytes per token", flush=True)
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
