"""The metric names the training loop logs, and the ones it reports to Ray Train / Tune.

The loop logs ``section/name`` keys to MLflow; at each checkpoint a few of them go to Ray Train
(and from there to Tune's schedulers and sweep summaries) with ``/`` written as ``_``. This is
the one place that lists them.
"""

from __future__ import annotations

TRAIN_LOSS = "train/loss"
TRAIN_LM_LOSS = "train/lm_loss"
TRAIN_RECON_LOSS = "train/recon_loss"
EVAL_LOSS = "eval/loss"
EVAL_ACCURACY = "eval/accuracy"
DEAD_CODE_FRACTION = "train/codebook/dead_code_fraction"
TOKENS_PER_S = "tokens_per_s"
# Dictionary metrics at eval steps once the codebooks are on (codebook.analysis.metrics):
# eval/metrics/{l0, fve, ce_loss_on, ce_loss_off, ce_loss_recovered, kl, tokens} and per site
# eval/metrics/<site>/{l0, fve, mse, dead_fraction, ce_loss, ce_loss_recovered, kl}
# (ce_loss, ce_loss_recovered and kl only with run.eval_site_metrics).
EVAL_METRICS = "eval/metrics"
EVAL_L0 = f"{EVAL_METRICS}/l0"
EVAL_FVE = f"{EVAL_METRICS}/fve"
EVAL_CE_LOSS_ON = f"{EVAL_METRICS}/ce_loss_on"
EVAL_CE_LOSS_OFF = f"{EVAL_METRICS}/ce_loss_off"
EVAL_CE_LOSS_RECOVERED = f"{EVAL_METRICS}/ce_loss_recovered"
EVAL_KL = f"{EVAL_METRICS}/kl"

# Logged (MLflow) name -> reported (Ray Train / Tune) name.
REPORTED: dict[str, str] = {
    name: name.replace("/", "_")
    for name in (TRAIN_LOSS, TRAIN_LM_LOSS, TRAIN_RECON_LOSS, EVAL_LOSS, EVAL_ACCURACY,
                 DEAD_CODE_FRACTION, TOKENS_PER_S)
}
REPORTED_NAMES: tuple[str, ...] = tuple(REPORTED.values())


def reported(metrics: dict[str, float]) -> dict[str, float]:
    """The subset of ``metrics`` reported to Ray Train, under the reported names."""
    return {REPORTED[k]: v for k, v in metrics.items() if k in REPORTED}
