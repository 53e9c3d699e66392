"""fastkd: fused knowledge-distillation losses for large-vocabulary language models.

``alpha`` is always the weight of the hard-label cross-entropy and ``1 - alpha`` the weight of
the T^2-scaled distillation term (see ``fastkd.kd_loss``). Every loss takes the options of
``fastkd.LossOptions``.
"""

from fastkd._options import LossOptions
from fastkd.backends import BackendStatus, backends
from fastkd.fused_linear_kd_loss import FusedLinearKDLoss, KDLossParts, fused_linear_kd_loss
from fastkd.kd_loss import KDLoss, kd_loss

__all__ = [
    "BackendStatus",
    "FusedLinearKDLoss",
    "KDLoss",
    "KDLossParts",
    "LossOptions",
    "backends",
    "fused_linear_kd_loss",
    "kd_loss",
]
__version__ = "0.1.0"
