"""Training engine: the loop (:func:`train`), atomic checkpoints, run logs and plots,
optimizer and schedule, and the inference helpers behind ``deepmetric eval`` / ``embed``."""

from .checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from .inference import embed_images, evaluate_checkpoint, list_images, load_model
from .optim import build_optimizer, lr_factor, set_lr
from .runlog import RunLog
from .trainer import (
    EvalSet,
    build_data,
    build_model_from_config,
    evaluate_model,
    gather,
    is_main,
    seed_everything,
    train,
    wrap_model,
)

__all__ = [
    "EvalSet",
    "RunLog",
    "build_data",
    "build_model_from_config",
    "build_optimizer",
    "embed_images",
    "evaluate_checkpoint",
    "evaluate_model",
    "find_checkpoint",
    "gather",
    "is_main",
    "list_images",
    "load_checkpoint",
    "load_model",
    "lr_factor",
    "save_checkpoint",
    "seed_everything",
    "set_lr",
    "train",
    "wrap_model",
]
