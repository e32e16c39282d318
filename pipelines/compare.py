"""Codebooks against TopK sparse autoencoders on the same model, sites, data and sparsity.

    python pipelines/compare.py --config configs/compare/fsm.yaml --quick   # minutes
    python pipelines/compare.py --config configs/compare/fsm.yaml           # the full default

Methods (``codebook.compare.methods``): the end-to-end ``codebook`` models (given, or trained
by the one training loop from the base, beside the plain-finetune control), ``posthoc_codebook``
and sparsify ``sae`` fitted to the frozen base model's cached activations (collected by Ray
Data actors) to the same token budget, each at every L0 multiple and seed, and the ``neuron``
baseline; all scored by one code (``codebook.compare.score``) under the held-out protocol.
Writes ``table.md``, ``table.json``, per-method reports and the SAEs (sparsify's format) to the
output folder, logs a parent MLflow run with a child per method, and prints the JSON summary
as its last line. On the FSM the rows hold the FSM report's figures (states as classifiers,
state-feature swaps); on text (``data.source: text``) the regex features' held-out precision.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script or a Ray job

from codebook.errors import ConfigError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
QUICK = {  # the comparison in a few minutes on 2 cores: pipelines/fsm.py's quick FSM
    "train": ["data.fsm={num_states: 24, num_edges: 4, base: 10, seed: 42, trajectory_states: 24}",
              "model.from_config.hidden_size=64", "model.from_config.num_hidden_layers=2",
              "model.from_config.intermediate_size=256", "codebook.num_codes=128",
              "codebook.start_step=150", "run.max_steps=250", "run.eval_every=250",
              "run.checkpoint_every=150", "run.log_every=50", "data.eval_blocks=128",
              "deepspeed.enabled=false"],
    "compare": [*(f"{m}.{k}" for m in ("sae", "posthoc") for k in (
                    "token_budget=24576", "batch_tokens=2048", "micro_batch_tokens=1024",
                    "eval_every_tokens=8192", "val_tokens=2048")),
                "sparsity=[1, 2]", "seeds=[0, 1]", "cache.sequences=256",
                "cache.rows_per_shard=32", "analysis.eval_sequences=128",
                "analysis.max_pairs=40"],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "compare" / "fsm.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a comparison setting, e.g. --set sae.steps=500")
    p.add_argument("--quick", action="store_true", help="a small FSM and model, a few minutes")
    p.add_argument("--out", type=Path, help="output folder (default: <out>/<name>[-quick])")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from codebook.compare.runner import prepare, run

    try:
        cfg, train, out = prepare(args.config, (QUICK["compare"] if args.quick else []) + args.set,
                                  QUICK["train"] if args.quick else [], args.out, args.quick)
    except ConfigError as err:
        sys.exit(f"config error: {err}")
    out.mkdir(parents=True, exist_ok=True)
    from codebook.compare.rows import json_default
    from codebook.ray_glue.activations import collect_cache
    from codebook.ray_glue.session import ray_session
    from codebook.ray_glue.train import fit

    try:
        with ray_session():
            summary = run(cfg, train, out, args.quick, collect_cache, fit)
    except ConfigError as err:
        sys.exit(f"config error: {err}")
    # After Ray is shut down: its log monitor prints worker lines until then, and the
    # summary is the last line that callers parse.
    print(json.dumps(summary, default=json_default), flush=True)
    return summary


if __name__ == "__main__":
    main()
