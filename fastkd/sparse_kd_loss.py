"""Sparse KD losses: the teacher as a cached top-k distribution (``fastkd cache-teacher``),
``sparse_kd_loss`` on logits and ``fused_linear_sparse_kd_loss`` on hidden states, with
``SparseKDLoss`` and ``FusedLinearSparseKDLoss`` (docs/design.md §11).

Per token the teacher is k token ids and their log-probabilities log p at the cache's
temperature T; the student's q = softmax(z_s / T) is over its full vocabulary. The ``tail``
option says how the mass outside the k ids counts. The row kernels, the autograd Function and
the fused chunk loop are those of the dense losses (``fastkd.kd_loss``,
``fastkd.fused_linear_kd_loss``), with the backends' sparse ops.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from fastkd import _inputs
from fastkd._options import SparseKernelArgs, SparseLossOptions, takes_loss_options
from fastkd.backends import RowKernel, get_backend, select_backend
from fastkd.fused_linear_kd_loss import (
    KDLossParts,
    _check_head,
    _chunk,
    _Plan,
    _row_bytes,
    _shift,
    run_fused,
)
from fastkd.kd_loss import KDLossFunction, LossModule, _check_inplace_target
from fastkd.reference import compute_dtype

# How far above 1 the cached probabilities may sum (they are rounded to their dtype).
_SUM_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-4}
_SUM_TOLERANCE_16BIT = 1e-2


def check_teacher_cache(
    ids: object,
    logprobs: object,
    batch_shape: torch.Size,
    device: torch.device,
    vocab: int,
    live: torch.Tensor | None,
    args: SparseKernelArgs,
    compute: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The cached teacher as the kernels take it: ids int64 [N, k] and log-probabilities
    [N, k] in the compute dtype, both with contiguous rows. ``live`` [N] (bool or None: all)
    marks the rows that count: on the CPU their values are checked (ids in range and distinct,
    log-probabilities not NaN, <= 0, summing to at most 1 + a rounding tolerance, and with
    some mass unless ``tail`` is bucket). On other devices, and under torch.compile, a check
    would synchronise with the host or break the graph: an id out of range gives a NaN loss."""
    ids = _inputs.check_tensor("teacher_ids", ids)
    logprobs = _inputs.check_tensor("teacher_logprobs", logprobs)
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"teacher_ids must be an int64 or int32 tensor, got {ids.dtype}")
    _inputs.check_float("teacher_logprobs", logprobs)
    n = batch_shape.numel()
    if ids.dim() < 1 or tuple(ids.shape[:-1]) not in (tuple(batch_shape), (n,)):
        raise ValueError(
            f"teacher_ids must have shape {(*batch_shape, 'k')} or {(n, 'k')} (k ids per token), "
            f"got {tuple(ids.shape)}"
        )
    if logprobs.shape != ids.shape:
        raise ValueError(
            f"teacher_logprobs must have the shape of teacher_ids {tuple(ids.shape)}, "
            f"got {tuple(logprobs.shape)}"
        )
    k = ids.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(
            f"teacher_ids must hold 1 to V = {vocab} ids per token (the student's vocabulary), "
            f"got k = {k}"
        )
    for name, t in (("teacher_ids", ids), ("teacher_logprobs", logprobs)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but the student is on {device}")
    ids = _inputs.rows_2d(ids.reshape(n, k)).long()
    logprobs = _inputs.rows_2d(logprobs.reshape(n, k)).to(compute)
    if args.kd_weight and device.type == "cpu" and not torch.compiler.is_compiling():
        rows = torch.arange(n) if live is None else live.nonzero()[:, 0]
        _check_values(ids[rows], logprobs[rows], rows, vocab, args)
    return ids, logprobs


def _check_values(ids, logprobs, rows, vocab: int, args: SparseKernelArgs) -> None:
    def fail(bad: torch.Tensor, what: str) -> None:
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"teacher_{what}; token {int(rows[i])} (flattened)")

    fail(
        ((ids < 0) | (ids >= vocab)).any(1),
        f"ids must be in [0, {vocab}) (the student's vocabulary)",
    )
    ordered = ids.sort(1).values
    fail((ordered[:, 1:] == ordered[:, :-1]).any(1), "ids must be distinct within a token")
    fail(logprobs.isnan().any(1), "logprobs must not be NaN")
    fail((logprobs > 0).any(1), "logprobs must be log-probabilities (<= 0)")
    tol = _SUM_TOLERANCE.get(logprobs.dtype, _SUM_TOLERANCE_16BIT)
    total = torch.logsumexp(logprobs.double(), 1)
    fail(total > math.log1p(tol), f"logprobs must sum (as probabilities) to at most 1 + {tol:g}")
    if args.tail != 0:  # renormalize/ignore divide by the cached mass
        fail(
            total == -math.inf, "logprobs of a token must not all be -inf (no mass to renormalize)"
        )


def _live_rows(labels, weights, n: int, ignore_index: int, device) -> torch.Tensor | None:
    if labels is None and weights is None:
        return None
    live = torch.ones(n, dtype=torch.bool, device=device)
    if labels is not None:
        live &= labels != ignore_index
    if weights is not None:
        live &= weights != 0
    return live


@takes_loss_options(SparseLossOptions)
def sparse_kd_loss(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    token_weights: torch.Tensor | None = None,
    inplace_grad: bool = False,
    backend: str | None = None,
    **options: Any,
) -> torch.Tensor:
    r"""KD loss of student logits against a cached top-k teacher, fused over the vocabulary.

    Per token, with the teacher's k ids K and log-probabilities log p_K (at the cache's
    temperature T) and the student's q = softmax(z_s / T) over its whole vocabulary::

        loss = alpha * CE(z_s, label) + (1 - alpha) * T^2 * D(p_bins, q_bins)

    where the bins are set by ``tail``: ``bucket`` (default) compares the (k+1)-bin
    distributions (p_K, 1 - sum p_K) and (q_K, 1 - sum q_K) (equal to :func:`fastkd.kd_loss`
    when k = V); ``renormalize`` both renormalized over K; ``ignore`` the teacher renormalized
    over K against the student's q_K (DistillKit's "zero"). **alpha is the weight of the
    hard-label cross-entropy**, as in ``kd_loss``; the other options are those of ``kd_loss``
    less the teacher's logit transform (docs/design.md §11).

    Args:
        student_logits: [N, V] or [B, S, V]; float32, bfloat16 or float16 (float64 runs on the
            reference backend).
        teacher_ids: [N, k] or [B, S, k] int64/int32 token ids, distinct per token, 1 <= k <= V.
        teacher_logprobs: same shape, any float dtype: log p of those ids (<= 0, summing as
            probabilities to at most 1; ``-inf`` allowed).
        labels: [N] or [B, S] class ids, ``ignore_index`` where a token does not count. Needed
            when the CE weight is > 0.
        <loss options>
        token_weights: optional [N] or [B, S] per-token multipliers, as in ``kd_loss``.
        inplace_grad: write the gradient over ``student_logits`` during the forward, as in
            ``kd_loss``.
        backend: ``triton``, ``cpu`` or ``reference`` (the ``cuda`` backend has no sparse
            kernels); default ``FASTKD_BACKEND``, else by device.

    Returns:
        The reduced loss (shape [] or, for ``none``, the labels' shape) in float32 (float64
        for float64 logits). Differentiable once, with respect to the student (and the token
        weights).
    """
    opts = SparseLossOptions(**options)
    student = _inputs.check_tensor("student_logits", student_logits)
    _inputs.check_float("student_logits", student)
    if inplace_grad:
        _check_inplace_target(student)
    _inputs.check_rows("student_logits", student, "V")
    batch_shape, vocab = student.shape[:-1], student.shape[-1]
    args = opts.sparse_kernel_args()
    labels = _inputs.check_labels(
        labels, batch_shape, student.device, vocab, args.ignore_index, args.ce_weight
    )
    weights = _inputs.check_token_weights(
        token_weights, batch_shape, student.device, compute_dtype(student.dtype)
    )
    live = _live_rows(labels, weights, batch_shape.numel(), args.ignore_index, student.device)
    ids, logprobs = check_teacher_cache(
        teacher_ids,
        teacher_logprobs,
        batch_shape,
        student.device,
        vocab,
        live,
        args,
        compute_dtype(student.dtype),
    )
    chosen = get_backend(select_backend(backend, student.device, student.dtype, sparse=True))
    rows = KDLossFunction.apply(
        _inputs.rows_2d(student),
        labels,
        _inputs.row_mask(weights),
        RowKernel(chosen, args),
        inplace_grad,
        ids,
        logprobs,
    )
    rows = _inputs.weigh_rows(rows, weights)
    return _inputs.reduce_loss(
        rows, labels, weights, args.ignore_index, opts.reduction, batch_shape
    )


@takes_loss_options(SparseLossOptions)
def fused_linear_sparse_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    student_bias: torch.Tensor | None = None,
    token_weights: torch.Tensor | None = None,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    shift_labels: bool = False,
    backend: str | None = None,
    return_parts: bool = False,
    **options: Any,
) -> torch.Tensor | KDLossParts:
    """:func:`sparse_kd_loss` computed from the student's hidden states and lm_head weights,
    chunk by chunk, so that the student's [N, V] logits never exist (and no teacher model is
    needed: its top-k is cached).

    Args:
        student_hidden: [N, Hs] or [B, S, Hs] final hidden states of the student.
        student_weight: [V, Hs] student lm_head.
        teacher_ids, teacher_logprobs: [N, k] / [B, S, k], one row per token (position t's
            row is the teacher's distribution at t, which ``shift_labels`` pairs with
            labels[t + 1]); as in :func:`sparse_kd_loss`.
        labels: [N] or [B, S] target ids (``ignore_index`` where not counted).
        <loss options>
        student_bias: optional [V] student lm_head bias.
        token_weights: optional [N] or [B, S] per-token multipliers.
        chunk_size, memory_budget: as in :func:`fastkd.fused_linear_kd_loss` (a row takes only
            the student's fp32 logits here).
        shift_labels: labels are at the input positions (transformers convention).
        backend: ``triton``, ``cpu`` or ``reference``; default by device.
        return_parts: return ``KDLossParts(loss, kd, ce)`` (detached parts, for logging).

    Gradients flow to ``student_hidden``, ``student_weight`` and ``student_bias``.

    Returns:
        The reduced loss, or ``KDLossParts`` with ``return_parts``, in float32 (float64 for
        float64 inputs). Differentiable once.
    """
    opts = SparseLossOptions(**options)
    h_s = _inputs.check_tensor("student_hidden", student_hidden)
    w_s = _inputs.check_tensor("student_weight", student_weight)
    _inputs.check_float("student_hidden", h_s)
    _inputs.check_rows("student_hidden", h_s, "H")
    _check_head("student", h_s, w_s, student_bias)
    batch_shape, vocab = h_s.shape[:-1], w_s.shape[0]
    args = opts.sparse_kernel_args()
    if shift_labels and labels is not None:
        labels = _shift(labels, batch_shape, args.ignore_index)
    labels = _inputs.check_labels(
        labels, batch_shape, h_s.device, vocab, args.ignore_index, args.ce_weight
    )
    weights = _inputs.check_token_weights(
        token_weights, batch_shape, h_s.device, compute_dtype(h_s.dtype)
    )
    live = _live_rows(labels, weights, batch_shape.numel(), args.ignore_index, h_s.device)
    teacher = check_teacher_cache(
        teacher_ids,
        teacher_logprobs,
        batch_shape,
        h_s.device,
        vocab,
        live,
        args,
        compute_dtype(h_s.dtype),
    )
    chosen = get_backend(select_backend(backend, h_s.device, h_s.dtype, sparse=True))
    low_precision = h_s.device.type == "cuda" and h_s.dtype in (torch.bfloat16, torch.float16)
    plan = _Plan(
        kernel=RowKernel(chosen, args),
        reduction=opts.reduction,
        chunk=_chunk(chunk_size, memory_budget, h_s, _row_bytes(args, vocab, None, low_precision)),
        low_precision_gemm=low_precision,
        parts=return_parts,
    )
    return run_fused(
        plan, _inputs.rows_2d(h_s), w_s, student_bias, labels, weights, teacher, batch_shape
    )


class SparseKDLoss(LossModule, function=sparse_kd_loss):
    """Module form of :func:`sparse_kd_loss`: options at construction, tensors in ``forward``.
    ``alpha`` is the hard-label CE weight. Example::

        loss_fn = fastkd.SparseKDLoss(temperature=1.0, alpha=0.1, tail="bucket")
        loss = loss_fn(student_logits, cached_ids, cached_logprobs, labels)
    """

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_ids: torch.Tensor,
        teacher_logprobs: torch.Tensor,
        labels: torch.Tensor | None = None,
        token_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return sparse_kd_loss(
            student_logits,
            teacher_ids,
            teacher_logprobs,
            labels,
            token_weights=token_weights,
            **self.settings,
        )


class FusedLinearSparseKDLoss(LossModule, function=fused_linear_sparse_kd_loss):
    """Module form of :func:`fused_linear_sparse_kd_loss`: options at construction, tensors in
    ``forward``. ``alpha`` is the CE weight."""

    def forward(
        self,
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        teacher_ids: torch.Tensor,
        teacher_logprobs: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        student_bias: torch.Tensor | None = None,
        token_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return fused_linear_sparse_kd_loss(
            student_hidden,
            student_weight,
            teacher_ids,
            teacher_logprobs,
            labels,
            student_bias=student_bias,
            token_weights=token_weights,
            **self.settings,
        )
