"""fastkd: fused knowledge-distillation losses for large-vocabulary language models.

``alpha`` is always the weight of the hard-label cross-entropy and ``1 - alpha`` the weight of
the T^2-scaled distillation term (see ``fastkd.kd_loss``). Every loss takes the options of
``fastkd.LossOptions``.
"""

import importlib
import sys
import types
from typing import TYPE_CHECKING

# The public names, imported on first use so that ``fastkd --help`` (``fastkd.cli``) does not
# import torch.
_EXPORTS = {
    "BackendStatus": "fastkd.backends",
    "backends": "fastkd.backends",
    "FusedLinearKDLoss": "fastkd.fused_linear_kd_loss",
    "KDLossParts": "fastkd.fused_linear_kd_loss",
    "fused_linear_kd_loss": "fastkd.fused_linear_kd_loss",
    "KDLoss": "fastkd.kd_loss",
    "kd_loss": "fastkd.kd_loss",
    "LossOptions": "fastkd._options",
    "SparseLossOptions": "fastkd._options",
    "FusedLinearSparseKDLoss": "fastkd.sparse_kd_loss",
    "SparseKDLoss": "fastkd.sparse_kd_loss",
    "fused_linear_sparse_kd_loss": "fastkd.sparse_kd_loss",
    "sparse_kd_loss": "fastkd.sparse_kd_loss",
}
__all__ = [
    "BackendStatus",
    "FusedLinearKDLoss",
    "FusedLinearSparseKDLoss",
    "KDLoss",
    "KDLossParts",
    "LossOptions",
    "SparseKDLoss",
    "SparseLossOptions",
    "backends",
    "fused_linear_kd_loss",
    "fused_linear_sparse_kd_loss",
    "kd_loss",
    "sparse_kd_loss",
]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from fastkd._options import LossOptions, SparseLossOptions
    from fastkd.backends import BackendStatus, backends
    from fastkd.fused_linear_kd_loss import FusedLinearKDLoss, KDLossParts, fused_linear_kd_loss
    from fastkd.kd_loss import KDLoss, kd_loss
    from fastkd.sparse_kd_loss import (
        FusedLinearSparseKDLoss,
        SparseKDLoss,
        fused_linear_sparse_kd_loss,
        sparse_kd_loss,
    )


class _Package(types.ModuleType):
    """``fastkd.kd_loss``, ``fastkd.fused_linear_kd_loss`` (and the sparse twins) are
    functions, as they were when imported eagerly: importing the submodules of those names
    must not rebind them."""

    def __getattr__(self, name: str):
        if name not in _EXPORTS:
            raise AttributeError(f"module 'fastkd' has no attribute {name!r}")
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        types.ModuleType.__setattr__(self, name, value)
        return value

    def __setattr__(self, name: str, value) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return  # the import system announcing the submodule of the same name
        super().__setattr__(name, value)

    def __dir__(self):
        return sorted({*super().__dir__(), *_EXPORTS})


sys.modules[__name__].__class__ = _Package
