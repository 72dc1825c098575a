"""Training budgets and CPU resources: the thread count, the ETA warning and the stop record.

Steps are the budget (``model.max_steps``): they fix what the weights are. ``model.max_minutes`` is
a safety: when it (or Ctrl-C, or a diverged loss) stops training before the planned steps, the
model is marked ``stopped_early`` in ``model.json`` with the reason, so that no later stage takes
a half-trained generator for the planned one. With ``max_steps: auto`` convergence is the plan:
training stops when the held-out selection criterion (:mod:`pipeline.models.selection`) has not
improved for ``model.patience`` evaluations, and that stop is recorded as ``converged``, not as an
early stop; the time cap cutting a run that was still improving is an early stop.

The thread count is chosen here too. On a CPU shared with other work, torch's intra-op threads
wait for each other at every parallel region: with a small model each region is short, and one
descheduled thread stalls the rest (docs/models.md, "Threads", has the measured figures). A
CPU-sized model therefore trains on one thread. The rule depends on the model only, never on the
machine's load: the thread count changes the floating-point order of CPU convolutions, so a
load-dependent choice would make the weights depend on what else the machine was doing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.models.config import ModelConfig

__all__ = [
    "SMALL_MODEL_WORK",
    "ETA_WARN_SECONDS",
    "ETA_PROBE_STEPS",
    "ETA_PROBE_SECONDS",
    "step_work",
    "planned_steps",
    "choose_threads",
    "StopRecord",
    "eta_warning",
]

# Work of one step (images x voxels x widest network) up to which a model is "CPU-sized" and
# trains on one thread; the demo and default recipes sit well below it (docs/models.md, "Threads").
SMALL_MODEL_WORK = 4_000_000
# An ETA above this on the CPU prints a warning with the fix.
ETA_WARN_SECONDS = 3600.0
# The ETA is estimated once, after this many steps of a session or this much training time.
ETA_PROBE_STEPS = 10
ETA_PROBE_SECONDS = 30.0


def step_work(config: ModelConfig) -> int:
    """A size measure of one training step: images per step x voxels per image x the wider network."""
    return config.batch_size * math.prod(config.image_size) * max(config.g_width, config.d_width)


def planned_steps(config: ModelConfig) -> int | None:
    """The step budget as a number: ``max_steps``, or None when convergence (``auto``) or time (null) is the plan."""
    return config.max_steps if isinstance(config.max_steps, int) else None


def choose_threads(config: ModelConfig) -> int | None:
    """torch's intra-op thread count for training with ``config`` (None: leave torch's default).

    ``model.num_threads`` as a number is used as given; ``null`` keeps torch's default (one
    thread per core); ``auto`` gives 1 for a CPU-sized model (:data:`SMALL_MODEL_WORK`), where a
    second thread gains little on a quiet machine and collapses throughput on a busy one, and
    torch's default for larger models.
    """
    if config.num_threads is None or isinstance(config.num_threads, int):
        return config.num_threads
    return 1 if step_work(config) <= SMALL_MODEL_WORK else None


@dataclass(frozen=True)
class StopRecord:
    """Why training stopped, as ``model.json`` records it.

    Attributes:
        steps_done: optimizer steps done.
        steps_planned: ``model.max_steps`` (None: convergence or the time budget is the plan).
        reason: why training stopped before the plan (None when it did not).
        converged: ``max_steps: auto`` stopped on the selection criterion's plateau (the plan reached).
    """

    steps_done: int
    steps_planned: int | None
    reason: str | None
    converged: bool = False

    @property
    def stopped_early(self) -> bool:
        """True when the weights are not the planned result."""
        if self.steps_planned is not None and self.steps_done < self.steps_planned:
            return True
        return self.reason is not None

    @classmethod
    def finished(
        cls, steps_done: int, config: ModelConfig, by_time: bool, converged: bool = False, progress: str = ""
    ) -> StopRecord:
        """The end of a session that was not interrupted: by the step budget, convergence, or the time cap.

        Args:
            steps_done: optimizer steps done.
            config: the ``model:`` section.
            by_time: the time cap ended the session.
            converged: with ``max_steps: auto``, the selection criterion had reached its plateau.
            progress: with ``max_steps: auto``, where the criterion stood (named in the reason).
        """
        planned = planned_steps(config)
        if config.max_steps == "auto":
            if converged:
                return cls(steps_done, None, None, converged=True)
            if by_time:
                reason = (
                    f"time budget max_minutes={config.max_minutes:g} reached at step {steps_done} while the "
                    f"selection criterion was still improving{progress}"
                )
                return cls(steps_done, None, reason)
            return cls(steps_done, None, None)
        if by_time and planned is not None and steps_done < planned:
            reason = f"time budget max_minutes={config.max_minutes:g} reached at step {steps_done} of {planned}"
            return cls(steps_done, planned, reason)
        return cls(steps_done, planned, None)

    @classmethod
    def in_progress(cls, steps_done: int, config: ModelConfig) -> StopRecord:
        """A checkpoint written while training runs: if the process ends here, the model is unfinished."""
        planned = planned_steps(config)
        if planned is not None and steps_done >= planned:
            return cls(steps_done, planned, None)
        of = f" of {planned}" if planned is not None else ""
        return cls(steps_done, planned, f"training had not finished: checkpoint of step {steps_done}{of} written while it ran")

    @classmethod
    def interrupted(cls, steps_done: int, config: ModelConfig) -> StopRecord:
        """Ctrl-C (SIGINT) stopped training at a step boundary; the checkpoint resumes it."""
        planned = planned_steps(config)
        of = f" of {planned}" if planned is not None else ""
        return cls(steps_done, planned, f"interrupted (Ctrl-C) at step {steps_done}{of}; --resume continues it")

    @classmethod
    def diverged(cls, steps_done: int, config: ModelConfig, at_step: int, loss: str, value: float) -> StopRecord:
        """A loss became NaN/inf at ``at_step``; the checkpoint of ``steps_done`` is kept."""
        return cls(
            steps_done,
            planned_steps(config),
            f"diverged at step {at_step} ({loss} is {value}); the checkpoint of step {steps_done} is kept",
        )


def eta_warning(
    config: ModelConfig,
    device_type: str,
    steps_done: int,
    seconds_per_step: float,
    train_seconds: float,
) -> str | None:
    """A warning when the measured speed makes the plan impractical, with the fix; None when it is fine.

    Args:
        config: the ``model:`` section (its step plan and time cap).
        device_type: ``cpu`` or ``cuda``.
        steps_done: steps done so far (over resumes).
        seconds_per_step: the measured mean seconds per step of this session.
        train_seconds: training time so far (over resumes), as the time cap counts it.
    """
    planned = planned_steps(config)
    if planned is None or seconds_per_step <= 0:
        return None
    remaining = max(0, planned - steps_done)
    eta = remaining * seconds_per_step
    cap = config.max_minutes if isinstance(config.max_minutes, (int, float)) else None  # `auto`: not planned yet
    if cap is not None and train_seconds + eta > cap * 60.0:
        reachable = steps_done + int(max(0.0, cap * 60.0 - train_seconds) / seconds_per_step)
        return (
            f"at the measured {seconds_per_step:.2f} s/step the {planned} planned steps need "
            f"{_duration(train_seconds + eta)}, beyond model.max_minutes={config.max_minutes:g}: training will stop "
            f"near step {reachable} and the model will be marked stopped early. Fix: free the machine, raise "
            "model.max_minutes, or plan fewer steps (model.max_steps)"
        )
    if device_type == "cpu" and eta > ETA_WARN_SECONDS:
        return (
            f"training on the CPU needs about {_duration(eta)} more ({remaining} steps at {seconds_per_step:.2f} s/step). "
            "Fix: fewer steps (model.max_steps / --max-steps), a smaller model.image_size or model.g_width/d_width "
            "(configs/demo.yaml is a CPU-sized recipe), or a GPU (model.device: cuda)"
        )
    return None


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"
