"""The training application's errors: each message says what went wrong and what to do."""
from __future__ import annotations

__all__ = ["TrainingError", "TrainingDiverged"]


class TrainingError(RuntimeError):
    """A training job cannot start or continue; the message says why and what to do."""


class TrainingDiverged(TrainingError):
    """NaN or inf appeared; names the epoch, batch and layer."""
