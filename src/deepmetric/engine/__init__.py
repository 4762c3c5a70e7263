"""Training engine: the loop (:func:`train`, :func:`train_step`), what a checkpoint holds
(:class:`TrainState`), builders, reproducibility, sharded evaluation, run folder and logs,
optimizer and schedule, and the inference helpers behind ``deepmetric eval`` / ``embed``.

Modules, one concern each: ``trainer`` (the loop), ``state`` (TrainState), ``checkpoint``
(atomic, checksummed files and links), ``preemption`` (stop on SIGTERM / SIGINT / SIGUSR1),
``divergence`` (the NaN guard), ``builders`` (data, model, loss, loaders from a Config),
``evaluator`` (sharded evaluation), ``reproducibility`` (seeds, RNG states, seeded batches),
``devices`` (train.device and train.amp), ``run_folder`` (where a run writes and resumes),
``runlog`` (metrics.jsonl, plots, printed lines), ``optim`` (optimizer groups, schedule),
``inference`` (evaluate / embed a checkpoint).
"""

from .builders import (
    EvalSet,
    build_criterion,
    build_data,
    build_eval_loader,
    build_model_from_config,
    build_train_loader,
    build_transforms,
)
from .checkpoint import CheckpointError, find_checkpoint, load_checkpoint, save_checkpoint
from .devices import amp_dtype, resolve_device
from .divergence import TrainingDiverged
from .evaluator import Evaluator, retrieval_metrics
from .inference import embed_images, evaluate_checkpoint, list_images, load_model
from .optim import build_optimizer, lr_factor, set_lr
from .reproducibility import seed_everything
from .runlog import RunLog
from .state import TrainState
from .trainer import train, train_step

__all__ = [
    "CheckpointError",
    "EvalSet",
    "Evaluator",
    "RunLog",
    "TrainState",
    "TrainingDiverged",
    "amp_dtype",
    "build_criterion",
    "build_data",
    "build_eval_loader",
    "build_model_from_config",
    "build_optimizer",
    "build_train_loader",
    "build_transforms",
    "embed_images",
    "evaluate_checkpoint",
    "find_checkpoint",
    "list_images",
    "load_checkpoint",
    "load_model",
    "lr_factor",
    "resolve_device",
    "retrieval_metrics",
    "save_checkpoint",
    "seed_everything",
    "set_lr",
    "train",
    "train_step",
]
