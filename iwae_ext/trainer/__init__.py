"""The trainer: ``iwae_ext.train(...)`` (the command line is :mod:`iwae_ext.cli.train`).

One run: load the data set, build the model, train with Adam (beta 0.9, 0.999, eps 1e-4; the
fused implementation) on the model kind's objective, checkpoint atomically after every epoch
(and when asked to stop), then evaluate L_{eval_k} on the whole test split, the ELBO, the train
log-likelihood, active units and the reconstruction error. ``out`` receives ``checkpoint.pt``
(loads with ``weights_only=True``), ``metrics.jsonl`` (one line per epoch) and ``metrics.json``.

Modules: :mod:`~iwae_ext.trainer.config` (:class:`~iwae_ext.trainer.config.TrainConfig`, the
learning-rate schedule), :mod:`~iwae_ext.trainer.model_kinds` (the model kinds:
:class:`~iwae_ext.trainer.model_kinds.ModelKind`, :func:`~iwae_ext.trainer.model_kinds.register`),
:mod:`~iwae_ext.trainer.loop` (the loop: keyed draws, no host synchronisation inside an epoch,
torch.compile, DistributedDataParallel), :mod:`~iwae_ext.trainer.checkpoint` and
:mod:`~iwae_ext.trainer.final` (the final evaluation, split across ranks).

Resuming (``resume=True``) continues exactly: model, optimizer, the model kind's state and the
position in the epoch are restored, and every random number is keyed by (seed, epoch, image), so
a stopped and resumed run ends bit for bit where an uninterrupted one ends (on the CPU, with the
same ``compile`` setting). SIGINT/SIGTERM stop a run at the next step boundary (the next
read-back under torch.distributed) after writing a checkpoint; a second SIGINT stops at once.
"""
from .checkpoint import CHECKPOINT_FORMAT, CorruptCheckpointError, load_checkpoint, read_checkpoint
from .config import RESUMABLE, TrainConfig, burda_schedule
from .final import final_metrics
from .loop import NonFiniteLossError, build_model, train
from .model_kinds import KINDS, ModelKind, register

__all__ = ["TrainConfig", "train", "load_checkpoint", "NonFiniteLossError", "CorruptCheckpointError",
           "burda_schedule", "CHECKPOINT_FORMAT", "KINDS", "ModelKind", "register", "build_model",
           "read_checkpoint", "final_metrics", "RESUMABLE"]
