"""Export codes of a code store: Neuronpedia-style JSON, a static dashboard, an HF dataset.

    python pipelines/export.py --store stores/shakespeare --codes mlp_1.0.42 attn_heads_3.1.7 \\
        --out exports/shakespeare
    python pipelines/export.py --store stores/shakespeare --all --min-count 20 --out exports/all
    python pipelines/export.py --store stores/shakespeare --publish      # README.md dataset card

Writes OUT/features/<site.group.code>.json (Neuronpedia's feature field names, checked by
codebook/store/neuronpedia_feature.schema.json) and OUT/dashboard.html, one file that opens
from disk (no server). The logit lens needs the model (--model, else the store's); without it
the export goes on without the lens and says so. --publish writes a dataset card so that
``datasets.load_dataset(STORE, "tokens")`` reads the store (or copies it to --publish DIR).
The last line printed is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from codebook.errors import ConfigError  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", required=True, help="a folder written by pipelines/extract.py")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--codes", nargs="+", metavar="CODE", help="codes as site.group.code")
    which.add_argument("--all", action="store_true", help="every code with >= --min-count "
                                                          "firings")
    p.add_argument("--min-count", type=int, default=1)
    p.add_argument("--out", help="export folder (features/, dashboard.html)")
    p.add_argument("--no-html", action="store_true", help="skip dashboard.html")
    p.add_argument("--model", help="model folder for the logit lens (default: the store's)")
    p.add_argument("--model-id", help="Neuronpedia modelId (default: the model folder's name)")
    p.add_argument("--source", default="codebook", help="Neuronpedia sourceSetName")
    p.add_argument("--examples", type=int, default=20, help="top examples per code")
    p.add_argument("--publish", nargs="?", const="", metavar="DIR",
                   help="write a datasets card into the store (or copy the store's Parquet "
                        "files to DIR with one)")
    args = p.parse_args(argv)
    exporting = args.codes is not None or args.all
    if not exporting and args.publish is None:
        p.error("give --codes CODE ... or --all (with --out), and/or --publish")
    if exporting and not args.out:
        p.error("--out is required with --codes / --all")
    if args.examples < 1:
        p.error("--examples must be >= 1")
    return args


def load_lens_model(path: str) -> tuple[Any, str | None]:
    """The codebook model at ``path``, or (None, why not)."""
    from codebook.resolve import load_trained_model

    try:
        return load_trained_model(path), None
    except Exception as err:  # the lens is optional: any failure exports without it
        return None, f"{type(err).__name__}: {err}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from codebook.store.code_page import PageOptions
    from codebook.store.export import export_codes, publish_dataset, resolve_codes
    from codebook.store.search import StoreSearch

    summary: dict[str, Any] = {}
    try:
        search = StoreSearch(args.store)  # ConfigError: not a store
        exporting = args.codes is not None or args.all
        if exporting:
            refs = resolve_codes(search, args.codes, args.min_count)  # before any work
            if not refs:
                raise ConfigError("min_count", f"no code fired {args.min_count} or more times",
                                  "lower --min-count")
            model, why = load_lens_model(args.model or search.meta.model)
            if model is None:
                print(f"warning: no logit lens, the model did not load ({why}); pass --model",
                      file=sys.stderr, flush=True)
            summary = export_codes(search, [r.name for r in refs], Path(args.out), model,
                                   options=PageOptions(examples=args.examples),
                                   model_id=args.model_id, source=args.source,
                                   html_page=not args.no_html)
            if why:
                summary["logit_lens_error"] = why
        if args.publish is not None:
            folder = publish_dataset(search.store, Path(args.publish) if args.publish else None)
            summary["dataset"] = str(folder)
    except ConfigError as err:
        sys.exit(f"config error: {err}")
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
