"""Training configuration: typed sections loaded from YAML, overridden by ``--set``, validated.

Every field is typed; unknown keys and wrong types are reported with their dotted path and the
fix before any worker, model or dataset is touched.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from codebook.config import CodebookConfig
from codebook.data.fsm import FSMConfig
from codebook.errors import ConfigError
from codebook.schema import build, flatten, read_yaml, set_dotted

__all__ = ["TrainConfig", "build", "load_config"]


@dataclass
class RunSection:
    name: str | None = None  # None: "<config name>-<timestamp>" (see resolve_run_name)
    # Where Ray Train writes checkpoints; must be reachable from every node (shared FS or cloud).
    storage_path: str = "~/codebook-runs"
    seed: int = 0
    max_steps: int = 1000
    log_every: int = 50
    eval_every: int = 250
    checkpoint_every: int = 250  # and at the last step; 0: never (benchmarks)
    num_workers: int = 1
    use_gpu: bool | None = None  # None: use GPUs when the cluster has them
    cpus_per_worker: float = 1.0
    max_failures: int = 2
    # Stop with TrainingDiverged once the loss has been non-finite for this many consecutive
    # steps (checked at log and checkpoint steps; 0 never stops). No checkpoint is written
    # while the loss is non-finite.
    max_nonfinite_steps: int = 20
    # At eval steps with the codebooks on, the per-site dictionary metrics (CE loss recovered
    # and KL with only that site's codebook on, against its zero ablation): 2 more forward
    # passes per site and eval batch. False keeps L0, FVE, dead codes and CE on / off (2
    # passes per batch): for big models with many sites.
    eval_site_metrics: bool = True


@dataclass
class ModelSection:
    # A hub name or local folder (``from_pretrained``), or a config to build a fresh model.
    name_or_path: str | None = None
    from_config: dict[str, Any] | None = None
    gguf_file: str | None = None
    tokenizer: str | None = None
    freeze_base: bool = False
    gradient_checkpointing: bool = False


@dataclass
class DataSection:
    source: Literal["fsm", "text", "parquet", "hf"] = "fsm"
    fsm: FSMConfig = field(default_factory=FSMConfig)
    paths: list[str] = field(default_factory=list)
    # source "hf": what ``datasets.load_dataset`` takes: a hub name (e.g. wikitext), a local
    # folder of data files, or a builder ("parquet", "text", "json", "csv") with hf_data_files.
    hf_dataset: str | None = None
    hf_config: str | None = None  # e.g. wikitext-103-raw-v1
    hf_split: str = "train"
    # ``data_files=``: files or globs; local ones relative to the cwd (to a local hf_dataset
    # folder when one is given), in a hub dataset relative to its repository.
    hf_data_files: list[str] | None = None
    text_column: str = "text"
    block_size: int = 128
    eval_blocks: int = 256
    max_blocks: int | None = None
    # Training blocks are drawn through a shuffle buffer of this many blocks per worker (seeded
    # per epoch, so resumes see the same order); 0 keeps corpus order. In corpus order a batch
    # is consecutive blocks of one document and a model learns to track the current document in
    # its weights rather than to read its context.
    shuffle_buffer: int = 16384
    # Documents held out for evaluation (text, parquet and hf sources): a document is held out
    # when a keyed hash of its text falls below this share (codebook.data.heldout); the eval
    # blocks then come from held-out documents only and no held-out document is trained on.
    # 0: the first eval_blocks blocks of the corpus are the eval set (their documents' other
    # blocks are trained on).
    heldout_fraction: float = 0.0
    heldout_seed: int = 0


@dataclass
class OptimSection:
    lr: float = 1e-3
    model_lr_factor: float = 1.0
    # The base model's factor once the codebooks are on (from codebook.start_step); None keeps
    # model_lr_factor. A slower base model lets the codes catch up after a plain warm-up phase.
    codebook_phase_model_lr_factor: float | None = None
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    batch_size: int = 32  # sequences per worker per micro-batch
    grad_accum: int = 1


@dataclass
class DeepSpeedSection:
    enabled: bool = True
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    # None: bf16 on GPU, fp32 on CPU. With deepspeed.enabled false, true runs the forward pass
    # under bf16 autocast on a GPU (fp32 master weights).
    bf16: bool | None = None

    def uses_bf16(self, device_type: str) -> bool:
        """Whether training on ``device_type`` runs in bf16: DeepSpeed's bf16 mode (``bf16``,
        or on a GPU where it is None), or without DeepSpeed bf16 autocast (``bf16`` true, on a
        GPU)."""
        if self.enabled:
            return self.bf16 if self.bf16 is not None else device_type == "cuda"
        return bool(self.bf16) and device_type == "cuda"


@dataclass
class MLflowSection:
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI or sqlite in storage_path
    experiment: str = "codebook"
    log_model: bool = True


@dataclass
class TrainConfig:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    codebook: CodebookConfig = field(default_factory=CodebookConfig)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    mlflow: MLflowSection = field(default_factory=MLflowSection)

    # ------------------------------------------------------------------ derived views
    @property
    def storage_path(self) -> Path:
        return Path(os.path.expanduser(self.run.storage_path)).resolve()

    @property
    def run_dir(self) -> Path:
        if self.run.name is None:
            raise ConfigError("run.name", "not resolved", "call resolve_run_name first")
        return self.storage_path / self.run.name

    def resolve_run_name(self, stem: str, resume: bool) -> str:
        """Fill in ``run.name``: a new ``<stem>-<timestamp>``, or on resume the newest such run."""
        if self.run.name is None:
            if resume:
                runs = sorted(self.storage_path.glob(f"{stem}-2*"), key=lambda p: p.name)
                if not runs:
                    raise ConfigError("--resume", f"no run named {stem}-* in {self.storage_path}",
                                      "pass --set run.name=NAME of the run to continue")
                self.run.name = runs[-1].name
            else:
                self.run.name = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        return self.run.name

    def tracking_uri(self) -> str:
        from codebook.tracking import default_tracking_uri

        return default_tracking_uri(self.mlflow.tracking_uri, self.storage_path)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat_params(self) -> dict[str, str]:
        """The resolved config as flat ``section.key`` strings (MLflow params)."""
        return {k: str(v) for k, v in flatten(self.to_dict(), keep=("from_config",)).items()}

    def resolve_paths(self, base: Path) -> TrainConfig:
        """Make every local path in the config absolute against ``base`` (the directory the
        command runs in), once, on the driver: Ray workers run in other directories.

        ``model.name_or_path`` and ``model.tokenizer`` may also be Hub ids: they become
        absolute only where ``base / value`` exists; a value that can only be a local path
        (``./x``, ``../x``, ``~/x``, ``a/b/c``) and does not exist is a ConfigError. Returns self.
        """
        def local(value: str) -> Path:
            path = Path(os.path.expanduser(value))
            return path if path.is_absolute() else base / path

        m, d = self.model, self.data
        self.run.storage_path = str(local(self.run.storage_path).resolve())
        for name in ("name_or_path", "tokenizer"):
            value = getattr(m, name)
            if value is None:
                continue
            if local(value).exists():
                setattr(m, name, str(local(value).resolve()))
            elif _only_local(value):
                raise ConfigError(f"model.{name}", f"{value} does not exist (looked in {base})",
                                  "run from the directory the config's relative paths start "
                                  "at (the repository root for configs/), or give an absolute "
                                  "path; a Hub id has the form owner/name")
        # (data.hf_dataset and data.hf_data_files are resolved on the driver when read.)
        d.paths = [str(local(p).absolute()) if "://" not in p else p for p in d.paths]
        return self

    # ------------------------------------------------------------------ validation
    def validate(self) -> TrainConfig:
        """Cross-field checks that need no model or cluster; returns self."""
        r, o, d = self.run, self.optim, self.data
        if r.checkpoint_every < 0:
            raise ConfigError("run.checkpoint_every", f"got {r.checkpoint_every}",
                              "use a number of steps, or 0 for no checkpoints at all")
        for name in ("max_steps", "log_every", "eval_every", "num_workers"):
            if getattr(r, name) <= 0:
                raise ConfigError(f"run.{name}", f"got {getattr(r, name)}", "use a value >= 1")
        if r.max_nonfinite_steps < 0:
            raise ConfigError("run.max_nonfinite_steps", f"got {r.max_nonfinite_steps}",
                              "use a number of steps >= 1, or 0 to never stop")
        for name in ("batch_size", "grad_accum"):
            if getattr(o, name) <= 0:
                raise ConfigError(f"optim.{name}", f"got {getattr(o, name)}", "use a value >= 1")
        if o.lr <= 0:
            raise ConfigError("optim.lr", f"got {o.lr}", "use a positive learning rate")
        for name in ("model_lr_factor", "codebook_phase_model_lr_factor"):
            value = getattr(o, name)
            if value is not None and value < 0:
                raise ConfigError(f"optim.{name}", f"got {value}", "use a factor >= 0")
        if self.deepspeed.zero_stage not in (0, 1, 2, 3):
            raise ConfigError("deepspeed.zero_stage", f"got {self.deepspeed.zero_stage}",
                              "use 0, 1, 2 or 3")
        if self.deepspeed.offload_params and self.deepspeed.zero_stage != 3:
            raise ConfigError("deepspeed.offload_params", "parameter offload needs ZeRO-3",
                              "set deepspeed.zero_stage=3 or offload_params=false")
        if (self.model.name_or_path is None) == (self.model.from_config is None):
            raise ConfigError("model", "give exactly one of name_or_path and from_config",
                              "set model.name_or_path (hub name / folder) or model.from_config")
        if d.source in ("text", "parquet"):
            if not d.paths:
                raise ConfigError("data.paths", f"source {d.source!r} needs files",
                                  "list files or folders in data.paths")
            for p in d.paths:
                if not Path(os.path.expanduser(p)).exists():
                    raise ConfigError("data.paths", f"{p} does not exist",
                                      "check the path (relative paths are from the cwd)")
        elif d.source == "hf" and not d.hf_dataset:
            raise ConfigError("data.hf_dataset", "source 'hf' needs a dataset name",
                              "set data.hf_dataset to a hub name, a local folder, or a builder "
                              "such as parquet with data.hf_data_files")
        if d.hf_data_files is not None and d.source != "hf":
            raise ConfigError("data.hf_data_files", f"only used by source 'hf', not {d.source!r}",
                              "set data.source=hf, or list the files in data.paths instead")
        if d.source != "fsm" and self.model.tokenizer is None and self.model.name_or_path is None:
            raise ConfigError("model.tokenizer", "text data needs a tokenizer",
                              "set model.tokenizer to a tokenizer folder or hub name")
        if d.shuffle_buffer < 0:
            raise ConfigError("data.shuffle_buffer", f"got {d.shuffle_buffer}",
                              "use a number of blocks, or 0 for corpus order")
        if not 0 <= d.heldout_fraction < 1:
            raise ConfigError("data.heldout_fraction", f"got {d.heldout_fraction}",
                              "use a share of documents in [0, 1), e.g. 0.1")
        if d.heldout_fraction and d.source == "fsm":
            raise ConfigError("data.heldout_fraction", "the FSM source has no documents",
                              "leave it 0: the FSM's eval sequences are drawn apart already")
        if d.block_size < 2:
            raise ConfigError("data.block_size", f"got {d.block_size}", "use at least 2 tokens")
        return self


# ---------------------------------------------------------------------- loading
def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                **flags: Any) -> TrainConfig:
    """Read YAML (optional), apply ``key=value`` overrides, build and validate a TrainConfig."""
    data: dict[str, Any] = {}
    if path is not None:
        data = read_yaml(path, "--config", "pass a YAML file from configs/") or {}
        if not isinstance(data, dict):
            raise ConfigError(str(path), "top level is not a mapping", "write `section: {...}`")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError("--set", f"{item!r} has no '='", "write --set section.key=value")
        key, raw = item.split("=", 1)
        set_dotted(data, key.strip(), yaml.safe_load(raw))
    for key, value in flags.items():
        if value is not None:
            set_dotted(data, key, value)
    return build(TrainConfig, data, "").resolve_paths(Path.cwd()).validate()


def _only_local(value: str) -> bool:
    """A name that cannot be a Hub id (owner/name, or a bare name)."""
    return (value.startswith((".", "/", "~")) or value.count("/") > 1
            or os.sep != "/" and os.sep in value)


