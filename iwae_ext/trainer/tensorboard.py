"""TensorBoard logging of a training run (``--tensorboard DIR``, ``TrainConfig.tensorboard``).

Written with ``torch.utils.tensorboard`` (the ``tensorboard`` package: ``pip install tensorboard``
or ``iwae_ext[tensorboard]``) by rank 0 only, at the end of each epoch from the values the epoch's
record already holds (so it adds no read-back to the training loop), and flushed there, so an
interrupted run loses nothing it had logged. The x-axis is the epoch. Scalars:

- ``train/bound``: the epoch's mean training bound (nats per image), ``train/lr``,
  ``train/seconds_per_epoch`` and ``train/step_ms`` (the epoch's wall time per step), and any
  other number the model kind records per epoch (e.g. AIWAE's acceptance rate) as ``train/<name>``;
- ``test/bound`` and ``test/elbo`` at the epochs of ``--test-every``;
- ``final/<metric>`` for every number of the final metrics (test and train L_k, ELBO, gaps,
  timings), at the last epoch; the run's configuration as text (``config``).

A resumed run appends to the same directory from the epoch it resumes at (``purge_step``: events
logged after the checkpoint it resumes from are dropped, so no epoch appears twice).
"""
from __future__ import annotations

import json
import numbers

__all__ = ["TensorBoardLog", "check_available"]

_NOT_SCALARS = ("epoch", "lr", "train_bound", "seconds", "train_seconds", "test_bound", "test_elbo",
                "test_seconds")


def check_available(where: str = "tensorboard"):
    """ValueError naming the field when torch.utils.tensorboard cannot be imported."""
    import importlib
    try:
        importlib.import_module("torch.utils.tensorboard")
    except ImportError as e:
        raise ValueError(f"{where}: logging to TensorBoard needs the tensorboard package "
                         f"(pip install tensorboard, or pip install iwae_ext[tensorboard]): {e}") from None


class TensorBoardLog:
    """One run's event file writer; ``epoch`` is the number of epochs already done (resume)."""

    def __init__(self, log_dir: str, epoch: int, steps_per_epoch: int, config: dict):
        from torch.utils.tensorboard import SummaryWriter
        self.steps_per_epoch = steps_per_epoch
        self.writer = SummaryWriter(log_dir, purge_step=epoch + 1 if epoch else None)
        if not epoch:
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=1, default=str) + "\n```", 0)
            self.writer.flush()

    def epoch(self, record: dict):
        """The scalars of one epoch's record (the trainer's metrics.jsonl line)."""
        w, e = self.writer, record["epoch"]
        w.add_scalar("train/bound", record["train_bound"], e)
        w.add_scalar("train/lr", record["lr"], e)
        w.add_scalar("train/seconds_per_epoch", record["seconds"], e)
        w.add_scalar("train/step_ms", 1000 * record["seconds"] / self.steps_per_epoch, e)
        for name in ("test_bound", "test_elbo"):
            if name in record:
                w.add_scalar(f"test/{name[5:]}", record[name], e)
        for name, value in record.items():
            if name not in _NOT_SCALARS and _number(value):
                w.add_scalar(f"train/{name}", value, e)
        w.flush()

    def final(self, metrics: dict, epoch: int):
        """Every number of the final metrics, nested ones by their path (final/timings/...)."""
        for name, value in _flatten(metrics):
            self.writer.add_scalar(f"final/{name}", value, epoch)
        self.writer.flush()

    def close(self):
        self.writer.close()


def _number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _flatten(metrics: dict, prefix: str = ""):
    for name, value in metrics.items():
        if name in ("config", "history"):
            continue
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{name}/")
        elif _number(value):
            yield f"{prefix}{name}", value
