"""Topic steering: find each topic's codes automatically, then generate with them switched on.

    python pipelines/steer.py --model RUN/checkpoint_xxx \\
        --topics configs/steering/text_steer_topics.yaml

The topics file (YAML)::

    prompts: ["Once upon a time", "The"]          # or --prompts
    background_files: [data/text/shakespeare]      # or background_texts: [...]
    topics:
      - name: dragon
        regex: '\\bdragons?\\b'                     # matched case-insensitively
        topic_texts: ["The dragon breathed fire ...", ...]   # or topic_files: [...]

For each topic: the codes most enriched on its texts against the background (log rate ratio), then N
baseline and N steered samples per prompt (the same seeds), the fraction matching the regex, and
the perplexity of both under the model with its codebooks off (a fluency check). Samples and the
table go to MLflow; the last line printed is JSON with per-topic ``baseline_rate``,
``steered_rate`` and ``codes_used``. ``--select effect`` instead tries each group's most enriched
codes one at a time and keeps, per group, the one that raises the model's probability of the
topic's words most (measured on the first background text). On the 1-layer text model
(``configs/text_steer.yaml``) 2 such codes per topic took 6 of 8 topics from <= 10% to >= 98%
matches in 200-token samples; the enriched codes, 4 per topic, 7 of 8 to >= 62%
(``benchmarks/results/steering_text_steer.md``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script or a Ray job


from codebook.errors import ConfigError  # noqa: E402
from codebook.topics import load_topics  # noqa: E402
from codebook.tracking import default_tracking_uri  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True,
                   help="training checkpoint, its hf/ folder, a saved codebook model, or an "
                        "MLflow URI such as runs:/<run_id>/model")
    p.add_argument("--tokenizer", help="default: the model folder")
    p.add_argument("--topics", required=True, help="topics YAML (see the module docstring)")
    p.add_argument("--prompts", nargs="*", help="overrides the topics file's prompts")
    p.add_argument("--samples", type=int, default=10, help="samples per prompt, per condition")
    p.add_argument("--max-new-tokens", type=int, default=200,
                   help="tokens per sample (the paper scored 200-token samples)")
    p.add_argument("--codes", type=int, default=10, help="codes per topic")
    p.add_argument("--min-count", type=int, default=2, help="topic firings a code needs")
    p.add_argument("--sites", nargs="*", help="sites to take codes from (default: all)")
    p.add_argument("--mode", choices=["overwrite", "add", "replace"], default="overwrite",
                   help="overwrite: topic codes take the lowest-ranked of their group's k slots "
                        "(at most k per group, as the reference steered); add: on top of the "
                        "chosen codes; replace: the only codes of their groups")
    p.add_argument("--select", choices=["ranked", "effect"], default="ranked",
                   help="ranked: the codes most enriched on the topic texts; effect: of each "
                        "group's --candidates most enriched codes, the one that alone raises the "
                        "model's probability of the topic's words most (on the first background "
                        "text), one per group, best first")
    p.add_argument("--candidates", type=int, default=20,
                   help="enriched codes tried per group with --select effect")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="steering", help="folder for samples and the table")
    p.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else "
                                          "sqlite in --out)")
    p.add_argument("--experiment", default="codebook-steering")
    return p.parse_args(argv)


def run(args: argparse.Namespace, spec: dict[str, Any], model: Any, tokenizer: Any
        ) -> dict[str, Any]:
    """Find codes, generate, score (``codebook.steering.steering_table``)."""
    from codebook.steering import steering_table

    return steering_table(model, tokenizer, spec, sites=args.sites, codes=args.codes,
                          select=args.select, candidates=args.candidates,
                          min_count=args.min_count, mode=args.mode, samples=args.samples,
                          max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          seed=args.seed)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    out = Path(args.out).expanduser().resolve()
    try:
        spec = load_topics(args.topics, args.prompts)
        for name, value in (("--samples", args.samples), ("--codes", args.codes),
                            ("--max-new-tokens", args.max_new_tokens),
                            ("--candidates", args.candidates)):
            if value < 1:
                raise ConfigError(name, f"must be >= 1, got {value}", "pass a positive number")
        from codebook.data.text import load_tokenizer
        from codebook.resolve import load_trained_model, resolve_model

        uri = default_tracking_uri(args.tracking_uri, out)
        model_path = resolve_model(args.model, out / "model", uri)
        tokenizer = load_tokenizer(args.tokenizer or model_path)
        model = load_trained_model(model_path)
        if args.select == "effect":  # the topic's words, as single tokens, before any work
            from codebook.steering import topic_token_ids

            for i, topic in enumerate(spec["topics"]):
                topic["token_ids"] = topic_token_ids(tokenizer, topic["regex"])
                if not topic["token_ids"]:
                    raise ConfigError(f"topics[{i}].regex",
                                      "matches no single-word token of the vocabulary",
                                      "--select effect scores a code by the probability of "
                                      "the topic's words; use --select ranked for this topic")
        if args.sites:
            for s in args.sites:
                model.site(s)
    except ConfigError as err:
        sys.exit(f"config error: {err}")
    started = time.perf_counter()
    result = run(args, spec, model, tokenizer)
    summary = write_outputs(result, out, uri, args, model_path)
    summary["minutes"] = round((time.perf_counter() - started) / 60, 2)
    print(json.dumps(summary), flush=True)
    return summary


def write_outputs(result: dict[str, Any], out: Path, uri: str, args: argparse.Namespace,
                  model_path: str) -> dict[str, Any]:
    """samples.jsonl, steering.csv/.json to ``out`` and to one MLflow run."""
    import csv
    import io

    from codebook.io import atomic_write
    from codebook.tracking import MLflowLogger, finish_run, start_run

    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "samples.jsonl") as fh:
        for s in result["samples"]:
            fh.write(json.dumps(s) + "\n")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(result["rows"][0]))
    writer.writeheader()
    for row in result["rows"]:
        writer.writerow({**row, "codes_used": " ".join(row["codes_used"])})
    with atomic_write(out / "steering.csv") as fh:
        fh.write(buf.getvalue())
    with atomic_write(out / "steering.json") as fh:
        json.dump(result["rows"], fh, indent=2)
    params = {"model": model_path, "samples": str(args.samples), "codes": str(args.codes),
              "mode": args.mode, "select": args.select, "candidates": str(args.candidates),
              "max_new_tokens": str(args.max_new_tokens), "seed": str(args.seed),
              "topics": args.topics}
    run_id = start_run(uri, args.experiment, f"steer-{Path(args.topics).stem}", params, {})
    metrics = {}
    for row in result["rows"]:
        for key in ("baseline_rate", "steered_rate", "steered_perplexity"):
            if row[key] is not None:
                metrics[f"{row['topic']}/{key}"] = row[key]
    MLflowLogger(uri, run_id).log(0, metrics)
    finish_run(uri, run_id, artifacts={"steering": out / "steering.csv",
                                       "samples": out / "samples.jsonl"})
    return {"topics": result["rows"], "samples": len(result["samples"]),
            "mlflow_run_id": run_id, "out": str(out)}


if __name__ == "__main__":
    main()
