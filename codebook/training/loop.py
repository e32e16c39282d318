"""The one training loop: FSM experiment, ``pipelines/train.py`` and every sweep trial run this.

It needs no Ray. The caller hands it where batches come from, where metrics and checkpoints go
(a ``Reporter``), and the process-group facts; the Ray pipeline supplies Ray Train versions of
those, tests and local tools may supply plain ones.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from tqdm import tqdm

from codebook.checkpoint import HF_DIR, STATE_FILE
from codebook.errors import TrainingDiverged
from codebook.io import atomic_write
from codebook.layer import reuse_selections
from codebook.model import CodebookModel
from codebook.training import metric_names as names
from codebook.training.config import TrainConfig
from codebook.training.engine import make_engine

Batch = dict[str, torch.Tensor]


class Reporter(Protocol):
    """Where the loop sends what it produces."""

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Metrics from rank 0 (e.g. to MLflow)."""

    def checkpoint(self, step: int, metrics: dict[str, float], directory: Path) -> None:
        """Called on every rank with the same step; ``directory`` holds this rank's files."""


@dataclass
class TrainState:
    step: int = 0
    micro_batches: int = 0  # data position: micro-batches consumed so far (all ranks alike)
    tokens: int = 0
    mlflow_run_id: str | None = None


@dataclass
class Workers:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")


@dataclass
class LoopData:
    """Data for the loop: ``train(start)`` yields micro-batches from micro-batch ``start`` on."""

    train: Callable[[int], Iterator[Batch]]
    eval: Callable[[], Iterable[Batch]]


def build_model(cfg: TrainConfig) -> CodebookModel:
    """The base model (``from_pretrained`` or fresh from a config) with codebooks attached."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(cfg.run.seed)
    m = cfg.model
    if m.from_config is not None:
        spec = dict(m.from_config)
        model_type = spec.pop("model_type", None)
        if model_type is None:
            from codebook.errors import ConfigError

            raise ConfigError("model.from_config.model_type", "missing",
                              "set model_type (gpt_neox, gpt2, gpt_neo, llama)")
        hf_config = AutoConfig.for_model(model_type, **spec)
        model = CodebookModel(AutoModelForCausalLM.from_config(hf_config), cfg.codebook)
    else:
        kwargs: dict[str, Any] = {"dtype": torch.float32}
        if m.gguf_file:
            kwargs["gguf_file"] = m.gguf_file
        model = CodebookModel.from_pretrained(m.name_or_path, cfg.codebook, **kwargs)
    if m.gradient_checkpointing:
        # Non-reentrant: the reentrant variant runs the block under no_grad, so the codebook
        # loss terms built inside it would carry no gradient. The recompute inside backward
        # reuses the codes chosen in the forward pass (reuse_selections) instead of scoring again.
        model.model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False,
                                           "context_fn": reuse_selections})
    return model


def train(cfg: TrainConfig, data: LoopData, reporter: Reporter, workers: Workers,
          resume_dir: Path | None = None, mlflow_run_id: str | None = None) -> dict[str, Any]:
    """Train to ``cfg.run.max_steps``; resume from ``resume_dir`` if given. Returns a summary."""
    model = build_model(cfg)
    settings = cfg.codebook
    engine = make_engine(model, cfg, workers.device)
    state = TrainState(mlflow_run_id=mlflow_run_id)
    if resume_dir is not None:
        engine.load(resume_dir)
        state = TrainState(**json.loads((resume_dir / STATE_FILE).read_text()))
        if workers.rank == 0:  # every restart shows in the run's metrics
            reporter.log(state.step, {"train/resumed_from_step": float(state.step)})
    model = engine.module
    model.train()
    model.set_step(state.step)
    accum = cfg.optim.grad_accum
    batches = data.train(state.micro_batches)
    tokenizer = checkpoint_tokenizer(cfg) if workers.rank == 0 else None
    loss_sum = torch.zeros(3, device=workers.device)  # total, lm, recon over the log window
    # consecutive optimizer steps with a non-finite loss (on the device: no per-step sync)
    nonfinite = torch.zeros((), dtype=torch.long, device=workers.device)
    replaced = torch.zeros((), dtype=torch.long, device=workers.device)  # dead codes re-seeded
    last_good = state.step if resume_dir is not None else None  # step of the last checkpoint
    window_steps, window_tokens, t0 = 0, 0, time.perf_counter()
    start_step, start_time = state.step, time.perf_counter()
    last: dict[str, float] = {}
    while state.step < cfg.run.max_steps:
        # Randomness (dead-code seeds, sampled recent inputs, dropout) depends on the step and
        # rank alone, so a resumed run draws what an uninterrupted one would.
        torch.manual_seed(cfg.run.seed * 1_000_003 + state.step * 1009 + workers.rank)
        if (state.step == settings.start_step and settings.kmeans_init_batches
                and model.codebooks):
            init = [next(batches) for _ in range(settings.kmeans_init_batches)]
            state.micro_batches += len(init)
            seconds = kmeans_init(model, init, engine, cfg, workers)
            if workers.rank == 0:
                reporter.log(state.step, {"codebook/kmeans_init_s": seconds})
                print(f"step {state.step}: codebooks initialised by k-means "
                      f"({len(init)} batches, {seconds:.1f}s)", flush=True)
        for layer in model.codebooks.values():
            layer.enabled = state.step >= settings.start_step
        step_finite = torch.ones((), dtype=torch.bool, device=workers.device)
        for _ in range(accum):
            batch = _to_device(next(batches), workers.device)
            out = engine(input_ids=batch["input_ids"], labels=batch["input_ids"])
            engine.backward(out.loss)
            engine.step()
            terms = torch.stack([out.loss, out.lm_loss, out.recon_loss]).detach().float()
            loss_sum += terms
            step_finite &= torch.isfinite(terms).all()
            n_tokens = batch["input_ids"].numel() * workers.world_size
            window_tokens += n_tokens
            state.tokens += n_tokens
            state.micro_batches += 1
        nonfinite = torch.where(step_finite, 0, nonfinite + 1)
        state.step += 1
        window_steps += 1
        model.set_step(state.step)
        if settings.dead_code_steps and state.step % settings.dead_code_steps == 0:
            replaced += replace_dead_codes(model, engine, cfg, workers)
        is_last = state.step == cfg.run.max_steps
        logs = state.step % cfg.run.log_every == 0 or is_last or state.step == 1
        saves = bool(cfg.run.checkpoint_every) and (
            state.step % cfg.run.checkpoint_every == 0 or is_last)
        streak = _max_across(nonfinite) if logs or saves else 0
        if logs:
            losses = _mean_across(loss_sum / (window_steps * accum))
            elapsed = time.perf_counter() - t0
            metrics = {names.TRAIN_LOSS: losses[0], names.TRAIN_LM_LOSS: losses[1],
                       names.TRAIN_RECON_LOSS: losses[2],
                       names.TOKENS_PER_S: window_tokens / elapsed,
                       "lr": engine.optimizer.param_groups[0]["lr"],  # codebooks' (if any)
                       "k": float(model.codebook_config.k_at(state.step))}
            metrics.update({f"lr/{g.get('name', i)}": g["lr"]
                            for i, g in enumerate(engine.optimizer.param_groups)})
            metrics.update({f"train/{k}": v for k, v in model.metrics(reset=True).items()})
            metrics["train/nonfinite_steps"] = float(streak)
            if settings.dead_code_steps:
                metrics["train/codebook/replaced_codes"] = float(replaced.item())
                replaced.zero_()
            done = state.step - start_step
            rate = (time.perf_counter() - start_time) / max(done, 1)
            if workers.rank == 0:
                reporter.log(state.step, metrics)
                print(f"step {state.step}/{cfg.run.max_steps} loss {losses[0]:.4f} "
                      f"lm {losses[1]:.4f} recon {losses[2]:.4f} "
                      f"{metrics[names.TOKENS_PER_S]:.0f} tok/s "
                      f"ETA {rate * (cfg.run.max_steps - state.step):.0f}s", flush=True)
            last.update(metrics)
            loss_sum.zero_()
            window_steps, window_tokens, t0 = 0, 0, time.perf_counter()
        if cfg.run.max_nonfinite_steps and streak >= cfg.run.max_nonfinite_steps:
            raise TrainingDiverged(state.step, streak,  # after the step's metrics are logged
                                   None if last_good is None else f"step {last_good}")
        paused = time.perf_counter()  # eval and checkpoints are kept out of tokens/s
        if state.step % cfg.run.eval_every == 0 or is_last:
            ev = evaluate(model, data.eval(), workers, cfg.run.eval_site_metrics)
            if workers.rank == 0:
                reporter.log(state.step, ev)
            last.update(ev)
            model.train()
        if saves and streak:
            if workers.rank == 0:
                print(f"step {state.step}: not saving a checkpoint, the loss has been non-finite "
                      f"for {streak} steps", flush=True)
        elif saves:
            save_checkpoint(model, engine, state, workers, reporter, last, tokenizer)
            last_good = state.step
        t0 += time.perf_counter() - paused
    return {"steps": state.step, "tokens": state.tokens,
            "final_train_loss": last.get(names.TRAIN_LOSS),
            "final_eval_loss": last.get(names.EVAL_LOSS),
            "metrics": last}


@torch.no_grad()
def evaluate(model: CodebookModel, batches: Iterable[Batch], workers: Workers,
             site_metrics: bool = True) -> dict[str, float]:
    """Eval loss, next-token accuracy, per-site reconstruction MSE and dead-code fraction; once
    the codebooks are on, also the dictionary metrics (``codebook.analysis.metrics``: L0, FVE,
    CE with codebooks on / off, dead codes; with ``site_metrics`` the per-site CE loss
    recovered and KL, 2 more forward passes per site and batch) as ``eval/metrics/...``.
    Loss, accuracy and ``eval/metrics/...`` are summed over the ranks (every rank returns the
    whole eval set's figures); the statistics ``eval/<site>/...`` stay this rank's."""
    from codebook.analysis.metrics import MetricsAccumulator

    model.eval()
    model.metrics(reset=True)
    totals = torch.zeros(3, dtype=torch.float64, device=workers.device)  # nll, correct, count
    codebooks_on = bool(model.codebooks) and all(
        layer.enabled for layer in model.codebooks.values())  # the same on every rank
    acc = MetricsAccumulator(model, site_metrics=site_metrics) if codebooks_on else None
    with _recording_stats(model):
        for batch in batches:
            ids = _to_device(batch, workers.device)["input_ids"]
            # the accumulator's all-codebooks-on pass is the eval pass itself
            logits = acc.update(ids) if acc is not None else model(input_ids=ids).logits
            logits = logits[:, :-1].float()
            target = ids[:, 1:]
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")
            correct = (logits.argmax(-1) == target).sum()
            totals += torch.stack([nll.double(), correct.double(),
                                   torch.tensor(target.numel(), dtype=torch.float64,
                                                device=totals.device)])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    nll, correct, count = totals.tolist()
    result = {names.EVAL_LOSS: nll / max(count, 1), names.EVAL_ACCURACY: correct / max(count, 1)}
    result.update({f"eval/{k}": v for k, v in model.metrics(reset=True).items()})
    if acc is not None:
        acc.all_reduce()
        result.update(acc.result().flat(names.EVAL_METRICS))
    return result


class _recording_stats:
    """Let codebook layers update their statistics in eval mode (they do in train mode)."""

    def __init__(self, model: CodebookModel):
        self.layers = list(model.codebooks.values())

    def __enter__(self):
        for layer in self.layers:
            layer.track_stats = True

    def __exit__(self, *exc):
        for layer in self.layers:
            layer.track_stats = False


# ---------------------------------------------------------------------- checkpoints
def checkpoint_tokenizer(cfg: TrainConfig) -> Any:
    """The tokenizer the text data is tokenised with (None for the FSM source, which has none)."""
    if cfg.data.source == "fsm":
        return None
    from codebook.data.text import load_tokenizer

    return load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path)


def save_checkpoint(model: CodebookModel, engine, state: TrainState, workers: Workers,
                    reporter: Reporter, metrics: dict[str, float], tokenizer: Any = None) -> None:
    """Every rank writes its files to a fresh local folder, then hands it to the reporter.

    Rank 0 adds the model in HF format (``hf/``: safetensors + configs, and the training
    tokenizer's files) and the trainer state (step, data position, MLflow run id). Files are
    written to temporary names first.
    """
    directory = Path(tempfile.mkdtemp(prefix=f"ckpt-{state.step:08d}-"))
    try:
        sync_code_ages(model, workers)
        engine.save(directory, workers.rank)
        params = list(model.parameters())
        with engine.full_params(params):
            if workers.rank == 0:
                model.save_pretrained(directory / HF_DIR, tokenizer=tokenizer)
        if workers.rank == 0:
            with atomic_write(directory / STATE_FILE) as fh:
                json.dump(asdict(state), fh, indent=2)
        reporter.checkpoint(state.step, metrics, directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# ---------------------------------------------------------------------- codebook maintenance
@torch.no_grad()
def kmeans_init(model: CodebookModel, batches: list[Batch], engine, cfg: TrainConfig,
                workers: Workers) -> float:
    """Initialise the codebooks by k-means on real activations, one site at a time in forward
    order: each codebook is fitted to the inputs its site gets with the codebooks before it
    already on, i.e. to what it will see once all are on. (Fitting every site to the plain
    model's activations lets the quantisation errors compound: on the FSM model that left the
    LM loss at chance when the codebooks came on.) Rank 0 fits; the codes are broadcast."""
    from codebook.interventions import recording

    started = time.perf_counter()
    model.eval()
    gen = torch.Generator(device=workers.device).manual_seed(cfg.run.seed)
    with model.codebooks_disabled():
        # forward order (resolve_sites); a progress bar on rank 0's terminal
        for name in tqdm(list(model.codebooks), desc="k-means init", unit="site",
                         disable=None if workers.rank == 0 else True):
            layer = model.codebooks[name]
            with recording(model, [name], activations=True) as rec:
                for batch in batches:
                    model(input_ids=_to_device(batch, workers.device)["input_ids"])
            with engine.full_params([layer.codes]):
                codes = layer.codes.detach().clone()
                if workers.rank == 0:
                    original = codes.clone()
                    layer.kmeans_init_(rec.activations[name].reshape(-1, layer.dim).float(),
                                       cfg.codebook.kmeans_iters, gen)
                    codes = layer.codes.detach().clone()
                    layer.codes.data.copy_(original)
                if workers.world_size > 1:
                    dist.broadcast(codes, 0)
            engine.set_param(layer.codes, codes)
            layer.enabled = True  # later sites are fitted with this codebook on
    model.train()
    return time.perf_counter() - started


@torch.no_grad()
def sync_code_ages(model: CodebookModel, workers: Workers) -> None:
    """Give every rank the across-rank ``steps_unused`` (a code's age is the time since it
    fired on any rank), so rank 0's saved copy, which every rank loads on resume, is the run's.
    Dead-code replacement takes the same minimum, and the minimum commutes with what follows:
    training goes on as it would have without a checkpoint."""
    if workers.world_size > 1:
        for layer in model.codebooks.values():
            dist.all_reduce(layer.steps_unused, op=dist.ReduceOp.MIN)


@torch.no_grad()
def replace_dead_codes(model: CodebookModel, engine, cfg: TrainConfig,
                       workers: Workers) -> torch.Tensor:
    """Re-seed dead codes identically on every rank; returns how many (rank 0, on device)."""
    settings = cfg.codebook
    total = torch.zeros((), dtype=torch.long, device=workers.device)
    for layer in model.codebooks.values():
        distributed = workers.world_size > 1
        if distributed:  # a code is dead only if it is dead on every rank
            dist.all_reduce(layer.steps_unused, op=dist.ReduceOp.MIN)
        with engine.full_params([layer.codes]):
            codes = layer.codes.detach().clone()
            if workers.rank == 0:
                original = layer.codes.detach().clone()
                dead = layer.replace_dead_codes(settings.dead_code_steps, settings.dead_code_noise)
                codes = layer.codes.detach().clone()
                layer.codes.data.copy_(original)
                total += dead.sum()
            if distributed:
                dist.broadcast(codes, 0)
                dist.broadcast(layer.steps_unused, 0)
        engine.set_param(layer.codes, codes)
    return total


# ---------------------------------------------------------------------- helpers
def _to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else torch.as_tensor(
        v, device=device)) for k, v in batch.items()}


def _mean_across(values: torch.Tensor) -> list[float]:
    """The mean over ranks, non-finite values kept as they are (a diverging run shows)."""
    if dist.is_available() and dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values.tolist()


def _max_across(value: torch.Tensor) -> int:
    """The largest value over ranks, so every rank takes the same decision."""
    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value.item())
