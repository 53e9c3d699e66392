"""The kernel ops every native backend implements, registered with ``torch.library``.

Two ops, with the same contract for the C++ (``fastkd::kd_loss_*``, CPU and CUDA dispatch keys)
and Triton (``fastkd::triton_kd_loss_*``) implementations:

``kd_loss_fwd(student [N, Vs], teacher [N, Vt], labels [N] int64 | None, weights [N] fp32 | None,
*args) -> (loss [N] fp32, stats [N, 4] fp32)``
    Pass 1 over each row: the log-sum-exps of z_s/T, z_t/T and z_s, the divergence and the CE.
    ``loss[i] = w_i * (ce_weight * CE + kd_weight * T^2 * D)`` with ``w_i = weights[i]`` (or 1)
    and ``w_i = 0`` where ``labels[i] == ignore_index``. ``stats[i] = (lse(z_s/T), lse(z_t/T),
    lse(z_s), G)`` where G is what the gradient of D needs beyond the log-sum-exps (the
    divergences that need it take a second pass over the row). Rows with ``w_i = 0`` are not
    read and get zeros. Without labels there is no CE term (``ce_weight`` is ignored). An
    out-of-range label gives a NaN loss (no host check on the device).

``kd_loss_bwd(student, teacher, labels, weights, stats, grad_loss [N] fp32, *args, grad)``
    Writes ``grad[i] = grad_loss[i] * d loss[i] / d student[i]`` in the student dtype, one pass
    per row. ``grad`` may be ``student`` itself (the in-place mode).

``*args`` is ``KDOptions.kernel_args(kd_vocab)``: divergence code, temperature, kd_weight,
ce_weight, mix (beta or skew), ignore_index, kd_vocab (student columns in the KD term), then
student logit scale and softcap, teacher logit scale and softcap (softcap 0 = none). Teacher
columns at or past Vt count as -inf (``vocab='pad'``). Rows may have any stride; columns
must be contiguous.

Row math shared by every kernel (fastkd/reference.py is the executable truth). Per column j:
x_s = softcap(scale_s * z_s), x_t likewise (-inf stays -inf); a = x_s / T, b = x_t / T,
c = x_s; lq = a - lse(a), lp = b - lse(b) over the KD columns j < kd_vocab; q, p their exps;
s1 = exp(c - lse(c)) over all student columns. A term whose leading probability is exactly 0
is 0. With lm the log of the mixture (computed as a logaddexp of the log-probabilities):

    divergence     D (loss)                         G (stats[:, 3])      dD/da_j
    kl             sum p (lp - lq)                  unused               q - p
    reverse_kl     sum q (lq - lp)                  D                    q (lq - lp - G)
    jsd (beta)     beta sum p(lp-lm) + (1-beta) sum q(lq-lm),  m = beta p + (1-beta) q
                                                    sum q (lq - lm)      (1-beta) q (lq - lm - G)
    tvd            0.5 sum |p - q|                  sum q h, h = 0.5 sign(q - p)     q (h - G)
    skew_kl (l)    sum p (lp - lm), m = l p + (1-l) q
                                                    sum q g, g = -(1-l) p / m        q (g - G)
    skew_reverse_kl (l)  sum q (lq - lm), m = l q + (1-l) p
                                                    sum q g, g = lq - lm - l q / m   q (g - G)

kl and reverse_kl need one pass for the loss (sum e^(b - max)(b - a), rescaled online as the
running max moves); the others take a second pass once the log-sum-exps are known. The CE is
lse(c) - c[label]. The gradient with respect to x_s is

    w * grad_loss * (ce_weight * (s1_j - [j == label]) + kd_weight * T * dD/da_j [j < kd_vocab])

then times d x_s / d z_s = scale_s * (1 - (x_s / cap)^2) (just scale_s without a softcap;
0 where z_s = -inf).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import NamedTuple

import torch

KD_ARGS_SCHEMA = (
    "int divergence, float temperature, float kd_weight, float ce_weight, float mix, "
    "int ignore_index, int kd_vocab, float student_scale, float student_softcap, "
    "float teacher_scale, float teacher_softcap"
)

# The schemas live here, once, for every implementation: csrc/ registers its CPU and CUDA
# kernels for the ``kd_loss_*`` names with TORCH_LIBRARY_IMPL, kernels/ (Triton) is
# registered below for the ``triton_kd_loss_*`` names.
_LIB = torch.library.Library("fastkd", "DEF")


class KernelOps(NamedTuple):
    fwd: Callable
    bwd: Callable


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
        f"{KD_ARGS_SCHEMA}) -> (Tensor, Tensor)"
    )
    _LIB.define(
        f"{_prefix}kd_loss_bwd(Tensor student, Tensor teacher, Tensor? labels, Tensor? weights, "
        f"Tensor stats, Tensor grad_loss, {KD_ARGS_SCHEMA}, Tensor(a!) grad) -> ()"
    )
    torch.library.register_fake(f"fastkd::{_prefix}kd_loss_fwd", _fake_fwd, lib=_LIB)
    torch.library.register_fake(f"fastkd::{_prefix}kd_loss_bwd", _fake_bwd, lib=_LIB)


@functools.cache
def load(backend: str) -> None:
    """Make a native backend's kernels callable: import the C++ extension (its static
    initialisers register the kernels) or register the Triton launchers."""
    if backend == "triton":
        from fastkd.kernels import kd_loss as tk

        for key in ("CPU", "CUDA"):  # CPU tensors run through Triton's interpreter
            _LIB.impl("triton_kd_loss_fwd", tk.kd_loss_fwd, key)
            _LIB.impl("triton_kd_loss_bwd", tk.kd_loss_bwd, key)
    else:
        importlib.import_module("fastkd._C")


def kernel_ops(backend: str) -> KernelOps:
    """The fwd/bwd ops of a loaded native backend (``cpu`` and ``cuda`` share the C++ ops,
    which dispatch on the tensors' device). Plain attribute lookups, so it traces."""
    prefix = "triton_" if backend == "triton" else ""
    return KernelOps(
        getattr(torch.ops.fastkd, f"{prefix}kd_loss_fwd"),
        getattr(torch.ops.fastkd, f"{prefix}kd_loss_bwd"),
    )
