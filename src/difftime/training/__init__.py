"""Training: the DSM loss on [eps, T], the trainer, and ``train_run``, the one way to train or
resume a run directory (used by the CLI, the study and the benchmarks)."""

from __future__ import annotations

from difftime.training.api import TrainResult, saved_config, train_run
from difftime.training.loss import dsm_loss, sample_time
from difftime.training.trainer import Trainer

__all__ = ["TrainResult", "Trainer", "dsm_loss", "sample_time", "saved_config", "train_run"]
