"""Teacher-student training of Hugging Face causal LMs with fastkd's fused losses."""

from fastkd.training.config import DistillConfig
from fastkd.training.distiller import Distiller, DistillOutput, progressive_distill
from fastkd.training.trainer import DistillationTrainer

__all__ = [
    "DistillConfig",
    "DistillOutput",
    "DistillationTrainer",
    "Distiller",
    "progressive_distill",
]
