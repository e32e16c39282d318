"""Finetune a codebook model with Ray Train + DeepSpeed; every run is logged to MLflow.

    python pipelines/train.py --config configs/fsm.yaml --max-steps 200
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python pipelines/train.py --config configs/fsm.yaml

The last line printed is a JSON summary: mlflow_run_id, steps, final_train_loss,
final_eval_loss, checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script or a Ray job

from codebook.checkpoint import verify_train_model  # noqa: E402
from codebook.errors import ConfigError  # noqa: E402
from codebook.training.config import load_config  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "fsm.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML file (configs/*.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set codebook.k=4 (repeatable)")
    p.add_argument("--max-steps", type=int, help="shorthand for --set run.max_steps=N")
    p.add_argument("--num-workers", type=int, help="shorthand for --set run.num_workers=N")
    p.add_argument("--resume", action="store_true",
                   help="continue run.name from its last checkpoint")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set, **{"run.max_steps": args.max_steps,
                                                    "run.num_workers": args.num_workers})
        cfg.resolve_run_name(Path(args.config).stem, args.resume)
        verify_train_model(cfg.model.name_or_path, cfg.model.gguf_file)  # before Ray starts
    except ConfigError as err:
        sys.exit(f"config error: {err}")
    print("resolved config:\n" + json.dumps(cfg.to_dict(), indent=2), flush=True)
    from codebook.ray_glue.session import ray_session
    from codebook.ray_glue.train import fit

    try:
        with ray_session():
            summary = fit(cfg, resume=args.resume)
    except ConfigError as err:
        sys.exit(f"config error: {err}")
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
