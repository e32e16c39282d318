"""Tiny training configurations for pipeline tests (seconds per run on 2 CPU cores)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FSM_CONFIG = REPO / "configs" / "fsm.yaml"


def tiny_overrides(storage: Path, name: str = "t", **extra) -> list[str]:
    """--set overrides that shrink configs/fsm.yaml to a 2-layer d32 model on a small FSM."""
    values = {
        "run.name": name,
        "run.storage_path": str(storage),
        "run.log_every": 2,
        "run.eval_every": 4,
        "run.checkpoint_every": 4,
        "run.cpus_per_worker": 0.5,
        "model.from_config.hidden_size": 32,
        "model.from_config.num_hidden_layers": 2,
        "model.from_config.intermediate_size": 64,
        "model.from_config.max_position_embeddings": 64,
        "data.fsm": "{num_states: 20, num_edges: 3, base: 10, seed: 1, trajectory_states: 12}",
        "data.eval_blocks": 32,
        "codebook.num_codes": 64,
        "codebook.init_std": 0.2,
        "optim.batch_size": 8,
        "optim.lr": 3.0e-3,
        "mlflow.tracking_uri": f"sqlite:///{storage / 'mlflow.db'}",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]
