"""FSDP2 (``torch.distributed.fsdp.fully_shard``) and the fused loss.

The fused loss multiplies hidden states by a model's whole head, so a head that FSDP2 shards
must be gathered for it; ``full_weights`` is that explicit gather.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn
from torch.distributed.fsdp import FSDPModule


def is_sharded(module: nn.Module | None) -> bool:
    """Whether ``module`` is managed by FSDP2 (its parameters are DTensor shards)."""
    return isinstance(module, FSDPModule)


@contextlib.contextmanager
def full_weights(*modules: nn.Module | None) -> Iterator[None]:
    """Inside the block, every FSDP2-sharded module among ``modules`` holds its full
    parameters; other modules (and ``None``) are left alone."""
    sharded = [m for m in modules if is_sharded(m)]
    for m in sharded:
        m.unshard()
    try:
        yield
    finally:
        for m in sharded:
            m.reshard()
