"""The project's errors for bad input and failed runs: each says what is wrong, where, and what
to do. All of them survive pickling (Ray hands a worker's exception to the driver that way)."""

from __future__ import annotations


class ConfigError(ValueError):
    """Bad configuration or input, raised before any expensive work starts.

    The message names the offending field (dotted path), the value, and the fix.
    """

    def __init__(self, field: str, problem: str, fix: str):
        self.field = field
        self.problem = problem
        self.fix = fix
        super().__init__(f"{field}: {problem}. Fix: {fix}")

    def __reduce__(self):
        return (type(self), (self.field, self.problem, self.fix))


class TrainingDiverged(RuntimeError):
    """The loss stayed non-finite for too many steps; names the last good checkpoint."""

    def __init__(self, step: int, nonfinite_steps: int, last_good_checkpoint: str | None):
        self.step = step
        self.nonfinite_steps = nonfinite_steps
        self.last_good_checkpoint = last_good_checkpoint
        where = (f"the last good checkpoint is {last_good_checkpoint}"
                 if last_good_checkpoint else "no checkpoint was written before it")
        super().__init__(
            f"training diverged: the loss was non-finite for {nonfinite_steps} consecutive "
            f"steps up to step {step}; {where}. Fix: lower optim.lr (or raise "
            "optim.warmup_steps / lower codebook.commit_weight), then --resume from that "
            "checkpoint or start again (run.max_nonfinite_steps sets the patience)")

    def __reduce__(self):
        return (type(self), (self.step, self.nonfinite_steps, self.last_good_checkpoint))


# Errors that rerunning cannot fix: Ray Train must not retry them.
DETERMINISTIC_ERRORS: tuple[type[Exception], ...] = (ConfigError, TrainingDiverged)
