"""The kernel ops every native backend implements, registered with ``torch.library``.

The op contract is docs/design.md §2: the same two ops for the C++ (``fastkd::kd_loss_*``, CPU
and CUDA dispatch keys, registered by ``fastkd._C``) and the Triton (``fastkd::triton_kd_loss_*``,
registered here) implementations::

    kd_loss_fwd(student, teacher, labels?, weights?, <KernelArgs>) -> (loss [N], stats [N, 4])
    kd_loss_bwd(student, teacher, labels?, weights?, stats, grad_loss, <KernelArgs>, grad) -> ()

and, for the C++ CPU kernels only, the two in one call (the gradient scale known in the
forward: the fused linear loop, ``kd_loss(inplace_grad=True)``)::

    kd_loss_fwd_bwd(student, teacher, labels?, weights?, grad_loss, <KernelArgs>, grad)
        -> (loss [N], stats [N, 4])

The sparse ops (a cached top-k teacher, docs/design.md §11) have the same three forms, with the
teacher's ids [N, k] and log-probabilities [N, k] instead of its logits, stats [N, 3] and the
scalars of ``SparseKernelArgs`` (C++: CPU only; Triton: ``triton_sparse_kd_loss_fwd/_bwd``)::

    sparse_kd_loss_fwd(student, ids, logprobs, labels?, weights?, <SparseKernelArgs>)
        -> (loss [N], stats [N, 3])

The scalar arguments are the fields of ``fastkd._options.KernelArgs`` (``SparseKernelArgs``), in
its order: the schemas are generated from it here, once, so no implementation can take them in
another order without failing the argument-set test (tests/test_options.py).
"""

from __future__ import annotations

import functools
import typing
from collections.abc import Callable
from typing import NamedTuple

import torch

from fastkd._options import KernelArgs, SparseKernelArgs

_SCHEMA_TYPES = {int: "int", float: "float"}


def _args_schema(args: type) -> str:
    return ", ".join(
        f"{_SCHEMA_TYPES[kind]} {name}" for name, kind in typing.get_type_hints(args).items()
    )


KERNEL_ARGS_SCHEMA = _args_schema(KernelArgs)
SPARSE_ARGS_SCHEMA = _args_schema(SparseKernelArgs)

_LIB = torch.library.Library("fastkd", "DEF")


class KernelOps(NamedTuple):
    fwd: Callable
    bwd: Callable
    sparse_fwd: Callable
    sparse_bwd: Callable


def _fake_fwd(student, teacher, labels, weights, *args):
    n = student.shape[0]
    return (
        student.new_empty((n,), dtype=torch.float32),
        student.new_empty((n, 4), dtype=torch.float32),
    )


def _fake_bwd(student, teacher, labels, weights, stats, grad_loss, *args):
    return None


for _prefix in ("", "triton_"):
    _LIB.define(
        f"{_prefix}kd_loss_fwd(Tensor student, Tensor teacher, Tensor? labels, Tensor? weights, "
        f"{KERNEL_ARGS_SCHEMA}) -> (Tensor, Tensor)"
    )
    _LIB.define(
        f"{_prefix}kd_loss_bwd(Tensor student, Tensor teacher, Tensor? labels, Tensor? weights, "
        f"Tensor stats, Tensor grad_loss, {KERNEL_ARGS_SCHEMA}, Tensor(a!) grad) -> ()"
    )
    torch.library.register_fake(f"fastkd::{_prefix}kd_loss_fwd", _fake_fwd, lib=_LIB)
    torch.library.register_fake(f"fastkd::{_prefix}kd_loss_bwd", _fake_bwd, lib=_LIB)


_LIB.define(
    "kd_loss_fwd_bwd(Tensor student, Tensor teacher, Tensor? labels, Tensor? weights, "
    f"Tensor grad_loss, {KERNEL_ARGS_SCHEMA}, Tensor(a!) grad) -> (Tensor, Tensor)"
)
torch.library.register_fake("fastkd::kd_loss_fwd_bwd", _fake_fwd, lib=_LIB)


def _fake_sparse_fwd(student, ids, logprobs, labels, weights, *args):
    n = student.shape[0]
    return (
        student.new_empty((n,), dtype=torch.float32),
        student.new_empty((n, 3), dtype=torch.float32),
    )


# The sparse (cached top-k teacher) ops, docs/design.md §11: ids [N, k] int64 and logprobs
# [N, k] fp32 instead of the teacher's logits; stats [N, 3].
for _prefix in ("", "triton_"):
    _LIB.define(
        f"{_prefix}sparse_kd_loss_fwd(Tensor student, Tensor ids, Tensor logprobs, "
        f"Tensor? labels, Tensor? weights, {SPARSE_ARGS_SCHEMA}) -> (Tensor, Tensor)"
    )
    _LIB.define(
        f"{_prefix}sparse_kd_loss_bwd(Tensor student, Tensor ids, Tensor logprobs, "
        f"Tensor? labels, Tensor? weights, Tensor stats, Tensor grad_loss, "
        f"{SPARSE_ARGS_SCHEMA}, Tensor(a!) grad) -> ()"
    )
    torch.library.register_fake(f"fastkd::{_prefix}sparse_kd_loss_fwd", _fake_sparse_fwd, lib=_LIB)
    torch.library.register_fake(f"fastkd::{_prefix}sparse_kd_loss_bwd", _fake_bwd, lib=_LIB)

_LIB.define(
    "sparse_kd_loss_fwd_bwd(Tensor student, Tensor ids, Tensor logprobs, Tensor? labels, "
    f"Tensor? weights, Tensor grad_loss, {SPARSE_ARGS_SCHEMA}, Tensor(a!) grad) "
    "-> (Tensor, Tensor)"
)
torch.library.register_fake("fastkd::sparse_kd_loss_fwd_bwd", _fake_sparse_fwd, lib=_LIB)


@functools.cache
def register_triton() -> None:
    """Register the Triton launchers for the ``triton_kd_loss_*`` and
    ``triton_sparse_kd_loss_*`` ops (CPU tensors run through Triton's interpreter)."""
    from fastkd.kernels import kd_loss as tk
    from fastkd.kernels import sparse_kd_loss as sk

    for key in ("CPU", "CUDA"):
        _LIB.impl("triton_kd_loss_fwd", tk.kd_loss_fwd, key)
        _LIB.impl("triton_kd_loss_bwd", tk.kd_loss_bwd, key)
        _LIB.impl("triton_sparse_kd_loss_fwd", sk.sparse_kd_loss_fwd, key)
        _LIB.impl("triton_sparse_kd_loss_bwd", sk.sparse_kd_loss_bwd, key)


def kernel_ops(prefix: str) -> KernelOps:
    """The ``fastkd::{prefix}kd_loss_*`` ops. Plain attribute lookups, so it traces."""
    return KernelOps(
        *(
            getattr(torch.ops.fastkd, f"{prefix}{name}")
            for name in ("kd_loss_fwd", "kd_loss_bwd", "sparse_kd_loss_fwd", "sparse_kd_loss_bwd")
        )
    )
