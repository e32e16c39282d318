"""Sweep files (``configs/sweeps/*.yaml``): read, check and turn into Ray Tune search spaces.

Everything here runs before Ray starts: a bad sweep file fails with a ``ConfigError`` naming
the field and the fix, and every value the search can produce is checked against the training
config validation (``codebook.training.config.load_config``) before any trial starts.

    name: fsm_k_codes                 # optional; default: the file name
    base_config: configs/fsm.yaml     # a training config (relative: to the cwd or the repo)
    overrides: [run.max_steps=40]     # like pipelines/train.py --set
    search:
      codebook.k: {grid: [1, 2]}
      codebook.num_codes: {choice: [32, 64]}
      optim.lr: {loguniform: [1.0e-4, 1.0e-2]}
    num_samples: 1                    # Tune repeats the grid this many times
    metric: eval_loss
    mode: min
    scheduler: {asha: {grace_period: 8, reduction_factor: 2, max_t: 40}}
    max_concurrent_trials: 1          # default: 1 on CPU, GPUs // workers per trial on GPU
    resources_per_trial: {trial_cpu: 0.01, num_workers: 1, cpus_per_worker: 0.49}
    seed: 0                           # for the random distributions
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from codebook.errors import ConfigError
from codebook.schema import build, read_yaml
from codebook.training.config import TrainConfig, load_config
from codebook.training.metric_names import REPORTED_NAMES

REPO = Path(__file__).resolve().parents[1]

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
SCHEDULERS = ("asha", "fifo")
# Set by the sweep itself for every trial; searching or overriding them makes no sense.
RESERVED = {
    "run.name": "each trial gets its own run name",
    "run.storage_path": "trials run inside the sweep folder (set run.storage_path in overrides "
                        "to move the whole sweep)",
    "run.checkpoint_every": "trials checkpoint (and report to Tune) at every run.eval_every",
    "run.num_workers": "set resources_per_trial.num_workers",
    "run.cpus_per_worker": "set resources_per_trial.cpus_per_worker",
    "run.use_gpu": "set resources_per_trial.use_gpu",
    "mlflow.tracking_uri": "all trials log to the sweep's MLflow (set it in overrides)",
    "mlflow.experiment": "all trials log to the sweep's experiment (set it in overrides)",
}
MAX_COMBINATIONS = 512  # discrete combinations checked one by one; beyond, each value alone
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# PyYAML (YAML 1.1) reads 1e-4 (no dot) as a string; the sweep file means a number.
_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


# ---------------------------------------------------------------------- the file's schema
@dataclass
class AshaFile:
    """``scheduler: {asha: {...}}``; unset values default from the base config."""

    grace_period: int | None = None
    reduction_factor: float = 2.0
    max_t: int | None = None
    time_attr: Literal["step", "training_iteration"] = "step"


@dataclass
class ResourcesFile:
    """``resources_per_trial``; unset values come from the base config's ``run`` section."""

    trial_cpu: float | None = None
    num_workers: int | None = None
    cpus_per_worker: float | None = None
    use_gpu: bool | None = None


@dataclass
class SweepFile:
    """A sweep file as written (see the module docstring); checked by ``codebook.schema``."""

    base_config: str
    search: dict[str, dict[str, list[Any]]]
    name: str | None = None
    overrides: list[str] = field(default_factory=list)
    num_samples: int = 1
    metric: str = "eval_loss"  # one of REPORTED_NAMES
    mode: Literal["min", "max"] = "min"
    scheduler: dict[str, AshaFile | None] | Literal["fifo"] | None = None
    max_concurrent_trials: int | None = None
    resources_per_trial: ResourcesFile | None = None
    seed: int | None = None


# ---------------------------------------------------------------------- the checked sweep
@dataclass
class Dimension:
    """One searched config key: ``{grid|choice: [values]}`` or ``{uniform|loguniform|randint:
    [low, high]}`` (randint: high excluded)."""

    key: str
    kind: str
    args: list[Any]

    def to_tune(self) -> Any:
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(list(self.args))
        if self.kind == "choice":
            return tune.choice(list(self.args))
        return getattr(tune, self.kind)(*self.args)

    def probe_values(self) -> list[Any]:
        """Values to check against the training config: every listed value, or both bounds."""
        if self.kind in ("grid", "choice"):
            return list(self.args)
        if self.kind == "randint":
            return [self.args[0], self.args[1] - 1]
        return [float(self.args[0]), float(self.args[1])]

    @property
    def discrete(self) -> bool:
        return self.kind in ("grid", "choice")

    def describe(self) -> str:
        return f"{self.kind} {json.dumps(self.args)}"


@dataclass
class Scheduler:
    kind: str  # "asha" or "fifo"
    grace_period: int = 1
    reduction_factor: float = 2.0
    max_t: int = 1
    time_attr: str = "step"

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "fifo":
            return {"fifo": {}}
        return {"asha": {"grace_period": self.grace_period, "max_t": self.max_t,
                         "reduction_factor": self.reduction_factor, "time_attr": self.time_attr}}


@dataclass
class Resources:
    trial_cpu: float = 0.01  # the trial's own actor: it only drives the inner TorchTrainer
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    use_gpu: bool | None = None  # None: GPUs when the cluster has them (as run.use_gpu)

    def to_dict(self) -> dict[str, Any]:
        return {"trial_cpu": self.trial_cpu, "num_workers": self.num_workers,
                "cpus_per_worker": self.cpus_per_worker, "use_gpu": self.use_gpu}


@dataclass
class SweepSpec:
    path: Path
    raw: dict[str, Any]
    name: str
    base_config: Path
    overrides: list[str]
    search: dict[str, Dimension]
    num_samples: int
    metric: str
    mode: str
    scheduler: Scheduler
    max_concurrent_trials: int | None
    resources: Resources
    seed: int | None
    base: TrainConfig = field(repr=False)  # base config + overrides, as the user wrote it

    # ------------------------------------------------------------------ places
    @property
    def storage_root(self) -> Path:
        return self.base.storage_path

    @property
    def sweep_dir(self) -> Path:
        return self.storage_root / self.name

    @property
    def runs_dir(self) -> Path:
        return self.sweep_dir / "runs"

    @property
    def tune_dir(self) -> Path:
        return self.sweep_dir / "tune"

    @property
    def frozen_base(self) -> Path:
        """The resolved base config every trial starts from (written when the sweep starts)."""
        return self.sweep_dir / "base_config.yaml"

    @property
    def tracking_uri(self) -> str:
        return self.base.tracking_uri()

    @property
    def experiment(self) -> str:
        return self.base.mlflow.experiment

    # ------------------------------------------------------------------ trial configs
    def fixed_values(self) -> dict[str, Any]:
        """What the sweep sets in every trial's config (resources, places, MLflow)."""
        r = self.resources
        return {"run.storage_path": str(self.runs_dir), "run.num_workers": r.num_workers,
                "run.cpus_per_worker": r.cpus_per_worker, "run.use_gpu": r.use_gpu,
                "mlflow.tracking_uri": self.tracking_uri,
                "mlflow.experiment": self.experiment}

    def resolved_base(self) -> dict[str, Any]:
        """The base config with the overrides and the sweep's fixed values, paths absolute."""
        cfg = trial_config(self.base_config, {}, overrides=self.overrides,
                           fixed=self.fixed_values())
        data = cfg.to_dict()
        data["data"]["paths"] = [str(Path(os.path.expanduser(p)).resolve())
                                 for p in data["data"]["paths"]]
        for key in ("name_or_path", "tokenizer"):
            value = data["model"][key]
            if value and Path(os.path.expanduser(value)).exists():
                data["model"][key] = str(Path(os.path.expanduser(value)).resolve())
        return data

    def write_frozen_base(self) -> Path:
        data = self.resolved_base()
        self.frozen_base.write_text(
            f"# Resolved base config of sweep {self.name} ({self.base_config} + overrides);\n"
            "# every trial starts from it. Written by tuning/sweep.py, do not edit.\n"
            + yaml.safe_dump(data, sort_keys=False))
        return self.frozen_base

    def max_steps_bound(self) -> int:
        dim = self.search.get("run.max_steps")
        return int(max(dim.probe_values())) if dim else self.base.run.max_steps

    def to_params(self) -> dict[str, str]:
        """The sweep settings as flat strings (the MLflow parent run's params)."""
        params = {"sweep.name": self.name, "sweep.file": str(self.path),
                  "sweep.base_config": str(self.base_config),
                  "sweep.overrides": json.dumps(self.overrides),
                  "sweep.num_samples": str(self.num_samples), "sweep.metric": self.metric,
                  "sweep.mode": self.mode, "sweep.scheduler": json.dumps(self.scheduler.to_dict()),
                  "sweep.max_concurrent_trials": str(self.max_concurrent_trials),
                  "sweep.resources_per_trial": json.dumps(self.resources.to_dict()),
                  "sweep.seed": str(self.seed)}
        params.update({f"search.{k}": d.describe() for k, d in self.search.items()})
        return params


def trial_config(base_config: str | Path, values: dict[str, Any], run_name: str | None = None,
                 overrides: list[str] | None = None, fixed: dict[str, Any] | None = None
                 ) -> TrainConfig:
    """A trial's training config: ``load_config(base_config, overrides)`` plus the sampled
    values; it checkpoints (and so reports to Tune) at every evaluation."""
    flags = dict(fixed or {})
    flags.update(values)
    if run_name is not None:
        flags["run.name"] = run_name
    cfg = load_config(base_config, overrides or [], **flags)
    cfg.run.checkpoint_every = cfg.run.eval_every
    return cfg.validate()


# ---------------------------------------------------------------------- loading
def load_spec(path: str | Path, name: str | None = None) -> SweepSpec:
    """Read and check a sweep file; raises ConfigError before anything runs."""
    path = Path(path)
    raw = read_yaml(path, "--config", "pass a YAML file from configs/sweeps/") or {}
    if not isinstance(raw, dict):
        raise ConfigError(str(path), "top level is not a mapping", "write `key: value` pairs")
    file = build(SweepFile, raw, "")
    sweep_name = name or file.name or path.stem
    if not _NAME.match(sweep_name):
        raise ConfigError("name", f"got {sweep_name!r}",
                          "use letters, digits, '_', '-' and '.' (it names the sweep folder)")
    base_path = _find_base(file.base_config)
    for item in file.overrides:
        key = item.split("=", 1)[0].strip()
        if "=" not in item:
            raise ConfigError("overrides", f"{item!r} has no '='", "write section.key=value")
        if key in RESERVED and key not in ("run.storage_path", "mlflow.tracking_uri",
                                           "mlflow.experiment"):
            raise ConfigError(f"overrides: {key}", "set by the sweep", RESERVED[key])
    try:
        base = load_config(base_path, file.overrides)
    except ConfigError as err:
        raise ConfigError(f"base_config/overrides: {err.field}", err.problem, err.fix) from err
    if file.metric not in REPORTED_NAMES:
        raise ConfigError("metric", f"got {file.metric!r}",
                          f"use a metric the training loop reports: {list(REPORTED_NAMES)}")
    for key in ("num_samples", "max_concurrent_trials"):
        value = getattr(file, key)
        if value is not None and value < 1:
            raise ConfigError(key, f"got {value!r}", "use an integer >= 1")

    spec = SweepSpec(path=path, raw=raw, name=sweep_name, base_config=base_path,
                     overrides=file.overrides, search=_parse_search(file.search),
                     num_samples=file.num_samples, metric=file.metric, mode=file.mode,
                     scheduler=Scheduler("fifo"),
                     max_concurrent_trials=file.max_concurrent_trials,
                     resources=_resources(file.resources_per_trial, base), seed=file.seed,
                     base=base)
    _check_search_space(spec)
    spec.scheduler = _scheduler(file.scheduler, spec)
    return spec


def _find_base(value: Any) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError("base_config", f"got {value!r}", "name a training config YAML file")
    p = Path(os.path.expanduser(value))
    for candidate in ([p] if p.is_absolute() else [Path.cwd() / p, REPO / p]):
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError("base_config", f"{value} not found (looked in {Path.cwd()} and {REPO})",
                      "name a training config file, e.g. configs/fsm.yaml")


def _parse_search(search: Any) -> dict[str, Dimension]:
    if not search:
        raise ConfigError("search", "empty", "list at least one key, e.g. "
                          "search: {codebook.k: {grid: [1, 2]}}")
    dims = {}
    for key, dist in search.items():
        where = f"search.{key}"
        if not isinstance(key, str) or "." not in key:
            raise ConfigError(where, "not a dotted config key",
                              "write section.key, e.g. codebook.k or optim.lr")
        if key in RESERVED:
            raise ConfigError(where, "set by the sweep, not searchable", RESERVED[key])
        if len(dist) != 1:
            raise ConfigError(where, f"got {dist!r}", "write exactly one distribution, e.g. "
                              "{grid: [1, 2]} (fixed values go in overrides)")
        kind, args = next(iter(dist.items()))
        if kind not in DISTRIBUTIONS:
            raise ConfigError(where, f"unknown distribution {kind!r}",
                              f"use one of {list(DISTRIBUTIONS)}")
        args = [_number(a) for a in args]
        if kind in ("grid", "choice"):
            if not args:
                raise ConfigError(f"{where}.{kind}", "empty list", "list at least one value")
        else:
            _check_bounds(f"{where}.{kind}", kind, args)
        dims[key] = Dimension(key, kind, args)
    return dims


def _number(value: Any) -> Any:
    if isinstance(value, str) and _FLOAT.match(value.strip()):
        return float(value)
    return value


def _check_bounds(where: str, kind: str, args: list[Any]) -> None:
    fix = "write [low, high] with low < high" + (" and low > 0" if kind == "loguniform" else "")
    if len(args) != 2:
        raise ConfigError(where, f"expected [low, high], got {args!r}", fix)
    numeric = all(isinstance(a, int | float) and not isinstance(a, bool)
                  and math.isfinite(a) for a in args)
    if not numeric:
        raise ConfigError(where, f"bounds must be finite numbers, got {args!r}", fix)
    if kind == "randint" and not all(isinstance(a, int) for a in args):
        raise ConfigError(where, f"randint needs integers, got {args!r}",
                          "write [low, high) as integers")
    low, high = args
    if not low < high:
        raise ConfigError(where, f"low {low} is not below high {high}", fix)
    if kind == "loguniform" and low <= 0:
        raise ConfigError(where, f"low {low} is not positive", fix)


def _resources(file: ResourcesFile | None, base: TrainConfig) -> Resources:
    res = Resources(num_workers=base.run.num_workers, cpus_per_worker=base.run.cpus_per_worker,
                    use_gpu=base.run.use_gpu)
    file = file or ResourcesFile()
    for key in ("trial_cpu", "cpus_per_worker"):
        value = getattr(file, key)
        if value is not None:
            if value < 0 or (key == "cpus_per_worker" and value == 0):
                raise ConfigError(f"resources_per_trial.{key}", f"got {value!r}",
                                  "use a number > 0 (fractions are fine, e.g. 0.49)")
            setattr(res, key, value)
    if file.num_workers is not None:
        if file.num_workers < 1:
            raise ConfigError("resources_per_trial.num_workers", f"got {file.num_workers!r}",
                              "use an integer >= 1")
        res.num_workers = file.num_workers
    if file.use_gpu is not None:
        res.use_gpu = file.use_gpu
    return res


def _scheduler(raw: dict[str, AshaFile | None] | str | None, spec: SweepSpec) -> Scheduler:
    if raw is None or raw == "fifo":
        return Scheduler("fifo")
    if len(raw) != 1:
        raise ConfigError("scheduler", f"got {raw!r}",
                          "write scheduler: {asha: {grace_period: N, ...}} or leave it out")
    kind, opts = next(iter(raw.items()))
    if kind not in SCHEDULERS:
        raise ConfigError("scheduler", f"unknown scheduler {kind!r}",
                          f"use one of {list(SCHEDULERS)}")
    if kind == "fifo":
        return Scheduler("fifo")
    opts = opts or AshaFile()
    max_steps = spec.max_steps_bound()
    every = spec.base.run.eval_every
    step = opts.time_attr == "step"
    horizon = max_steps if step else math.ceil(max_steps / every)
    grace = opts.grace_period if opts.grace_period is not None else (every if step else 1)
    max_t = opts.max_t if opts.max_t is not None else horizon
    for key, value in (("grace_period", grace), ("max_t", max_t)):
        if value < 1:
            raise ConfigError(f"scheduler.asha.{key}", f"got {value!r}", "use an integer >= 1")
    if opts.reduction_factor <= 1:
        raise ConfigError("scheduler.asha.reduction_factor", f"got {opts.reduction_factor!r}",
                          "use a number > 1 (2 keeps the better half at each rung)")
    if grace >= min(max_t, horizon):
        raise ConfigError("scheduler.asha.grace_period",
                          f"{grace} leaves no rung before the end of training (max_t {max_t}, "
                          f"{opts.time_attr} at the end {horizon}), so ASHA can stop nothing "
                          "early", "lower grace_period or raise run.max_steps")
    return Scheduler("asha", grace_period=grace, reduction_factor=opts.reduction_factor,
                     max_t=max_t, time_attr=opts.time_attr)


def _check_search_space(spec: SweepSpec) -> None:
    """Every value the search can produce must make a valid training config: each value on the
    base config alone, then every combination of the discrete values (continuous ones at both
    bounds), or, past MAX_COMBINATIONS, each value with the other keys' first values."""
    fixed = spec.fixed_values()

    def check(values: dict[str, Any], where: str, what: str) -> None:
        try:
            trial_config(spec.base_config, values, overrides=spec.overrides, fixed=fixed)
        except ConfigError as err:
            raise ConfigError(where, f"{what} fails the training config check "
                              f"({err.field}: {err.problem})", err.fix) from err

    for key, dim in spec.search.items():
        for value in dim.probe_values():
            check({key: value}, f"search.{key}", f"value {value!r}")
    discrete = [k for k, d in spec.search.items() if d.discrete]
    continuous = [k for k, d in spec.search.items() if not d.discrete]
    if math.prod(len(spec.search[k].probe_values()) for k in discrete) > MAX_COMBINATIONS:
        first = {k: d.probe_values()[0] for k, d in spec.search.items()}
        for key, dim in spec.search.items():
            for value in dim.probe_values():
                check({**first, key: value}, "search", f"the combination {({**first, key: value})}")
        return
    for combo in itertools.product(*(spec.search[k].probe_values() for k in discrete)):
        for bound in (0, -1) if continuous else (0,):
            values = dict(zip(discrete, combo, strict=True))
            values.update({k: spec.search[k].probe_values()[bound] for k in continuous})
            check(values, "search", f"the combination {values}")
