"""The LM table: what codebooks cost a language model, from one pretrained checkpoint.

    python pipelines/lm_table.py --config configs/lm_table/text4.yaml    # the CPU headline
    python pipelines/lm_table.py --quick                                 # a few minutes, CI

Every row (``finetuned`` without codebooks, then the config's codebook rows) is finetuned from
the same checkpoint with the same data, steps and schedule by the one training loop under Ray
Train, and scored on the same held-out documents (``codebook.lm_table``); ``pretrained`` is
the checkpoint as it is. A config whose model is built ``from_config`` is pretrained here first.
Writes ``table.md``, ``table.json`` (also the last line printed) and ``loss_vs_k.png`` to the
output folder and an MLflow parent run with a child per row. A rerun skips finished rows and
resumes an interrupted one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script or a Ray job

from codebook.errors import ConfigError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "lm_table" / "text4.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a table setting, e.g. --set eval.blocks=128")
    p.add_argument("--quick", action="store_true",
                   help="a tiny model on a synthetic corpus, every row a few steps")
    p.add_argument("--out", type=Path, help="output folder (default: <out>/<name>[-quick])")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from codebook.lm_table.config import load_lm_table_config
    from codebook.lm_table.quick import quick_overrides
    from codebook.lm_table.runner import prepare, run

    try:
        cfg = load_lm_table_config(args.config, args.set)
        out = (args.out or Path(cfg.out).expanduser()
               / (cfg.name + ("-quick" if args.quick else ""))).resolve()
        extra = quick_overrides(out / "quick-data") if args.quick else []
        plan = prepare(args.config, args.set, extra, out)
    except ConfigError as err:
        sys.exit(f"config error: {err}")
    from codebook.ray_glue.session import ray_session
    from codebook.ray_glue.train import fit

    def ray_fit(tc, resume: bool, parent: str | None) -> dict:
        return fit(tc, resume=resume, mlflow_parent_run_id=parent)

    try:
        with ray_session():
            summary = run(plan, ray_fit)
    except ConfigError as err:
        sys.exit(f"config error: {err}")
    # After Ray is shut down: its log monitor prints worker lines until then, and the
    # summary is the last line that callers parse.
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
