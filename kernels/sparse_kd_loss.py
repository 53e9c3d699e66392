"""Triton kernels of the sparse KD loss (a cached top-k teacher: ids and log-probabilities
instead of logits), and their launchers (docs/design.md §11).

One program per row. The forward gathers the k student logits at the cached ids into one
KP-wide block (k padded to a power of two), then streams the row's V columns in BLOCK-wide
tiles with an online log-sum-exp of x/T over the columns outside K (logit units, x/T never
formed; the K columns are left out, not subtracted, so the student's tail mass keeps its
relative precision) and of x over all columns (the CE), as the dense kernels do
(``kernels/kd_loss.py``: the same transform, 16-byte-aligned tiles and numeric-edge
conventions), then forms the bins of the tail mode and the divergence over them: O(k) beyond
the stream. The backward rebuilds the bins from the stats and the k gathered logits, streams
the row once writing the part of the gradient every column shares (CE, and T q_j A for the KD
term of the bucket and ignore modes), then stores the k gathered columns' full gradient.
Nothing of size [N, V] is allocated but the gradient. Truth: ``fastkd.reference.sparse_loss_rows``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastkd._options import TAILS, SparseKernelArgs
from fastkd.kernels.kd_loss import (
    JSD,
    KL,
    LOG_MIN,
    MAX_FLOAT,
    NEG_INF,
    POS_INF,
    REVERSE_KL,
    SKEW_KL,
    TVD,
    _alignment,
    _dtransform,
    _edge_cols,
    _log_mix,
    _online,
    _row_base,
    _row_span,
    _row_weight,
    _transform,
    _zero_row,
    launch_config,
    mixture_logs,
    on_device,
)

BUCKET: tl.constexpr = tl.constexpr(TAILS.index("bucket"))
RENORMALIZE: tl.constexpr = tl.constexpr(TAILS.index("renormalize"))
IGNORE: tl.constexpr = tl.constexpr(TAILS.index("ignore"))

# The least probability of a tail bin, 2^-14 (docs/design.md §11; fastkd/reference.py
# TAIL_FLOOR).
TAIL_FLOOR: tl.constexpr = tl.constexpr(2.0**-14)


@triton.jit
def _load_x(s_row, c, mask, s_scale, s_cap, S_CAP: tl.constexpr):
    """Transformed student logits at the columns c (-inf where masked)."""
    z = tl.load(s_row + c, mask=mask, other=NEG_INF).to(tl.float32)
    return _transform(z, s_scale, s_cap, S_CAP)


@triton.jit
def _lse_tile(m_a, s_a, m_c, s_c, x, xa, inv_t, HAS_KD: tl.constexpr, HAS_CE: tl.constexpr):
    """Merge one tile into the running log-sum-exps of xa/T (KD: the tile with its cached
    columns -inf) and x (CE: every column), logit units."""
    if HAS_KD:
        m_a, s_a, _, _ = _online(m_a, s_a, xa, inv_t)
    if HAS_CE:
        m_c, s_c, _, _ = _online(m_c, s_c, x, 1.0)
    return m_a, s_a, m_c, s_c


@triton.jit
def _outside_k(x, col, sid, lo_id, hi_id, V):
    """x with -inf at its columns col (row positions) that are cached ids, of which those in
    [lo_id, hi_id) can be in this tile: sid the row's ids sorted (V past k and at ids outside
    [0, V)). One small reduction per tile and per id in it, one compare per column and id."""
    n_in = tl.sum(((sid >= lo_id) & (sid < hi_id)).to(tl.int32), 0)
    cur = lo_id
    for _ in range(n_in):
        cand = tl.min(tl.where(sid >= cur, sid, V), 0)  # the next cached id in the tile
        x = tl.where(col == cand, NEG_INF, x)
        cur = cand + 1
    return x


@triton.jit
def _lse_row(
    s_row, pad, lo, hi, V, inv_t, s_scale, s_cap, sid, HAS_KD: tl.constexpr,
    HAS_CE: tl.constexpr, S_CAP: tl.constexpr, ALIGN: tl.constexpr, KP: tl.constexpr,
    BLOCK: tl.constexpr
):  # fmt: skip
    """The forward's pass over a row: (max, sum) of x/T over the columns outside K (sid: the
    sorted cached ids) and of x over all, aligned part then edges. The cached columns are left
    out rather than subtracted, so the tail mass outside K keeps its relative precision."""
    m_a = tl.full((), NEG_INF, tl.float32)
    s_a = tl.zeros((), tl.float32)
    m_c = tl.full((), NEG_INF, tl.float32)
    s_c = tl.zeros((), tl.float32)
    for start in range(lo, hi, BLOCK):
        c = start + tl.arange(0, BLOCK)
        x = _load_x(s_row, c, c < hi, s_scale, s_cap, S_CAP)
        xa = x
        if HAS_KD:
            xa = _outside_k(x, c - pad, sid, start - pad, start - pad + BLOCK, V)
        m_a, s_a, m_c, s_c = _lse_tile(m_a, s_a, m_c, s_c, x, xa, inv_t, HAS_KD, HAS_CE)
    if ALIGN > 1:
        edge, in_row = _edge_cols(pad, lo, hi, V, ALIGN)
        x = _load_x(s_row, edge, in_row, s_scale, s_cap, S_CAP)
        xa = x
        if HAS_KD:  # the edge columns: the row's first lo - pad and its last from hi - pad
            xa = _outside_k(x, edge - pad, sid, 0, lo - pad, V)
            xa = _outside_k(xa, edge - pad, sid, hi - pad, V, V)
        m_a, s_a, m_c, s_c = _lse_tile(m_a, s_a, m_c, s_c, x, xa, inv_t, HAS_KD, HAS_CE)
    return m_a, s_a, m_c, s_c


@triton.jit
def _gather(
    s_row, ID, LP, row, stride_i, stride_l, pad, K, V, s_scale, s_cap, S_CAP: tl.constexpr,
    KP: tl.constexpr
):  # fmt: skip
    """The row's k cached ids and log-probabilities and the transformed student logits there,
    as KP-wide blocks (-inf log-probability and logit past k), the mask of the ids in [0, V),
    and whether some id is outside it (never dereferenced: the row's loss is NaN)."""
    i = tl.arange(0, KP)
    in_k = i < K
    ids = tl.load(ID + row * stride_i + i, mask=in_k, other=0)
    valid = in_k & (ids >= 0) & (ids < V)
    x = _load_x(s_row + pad, ids, valid, s_scale, s_cap, S_CAP)
    lp = tl.load(LP + row * stride_l + i, mask=in_k, other=NEG_INF).to(tl.float32)
    bad = tl.sum((in_k & ~valid).to(tl.int32), 0) > 0
    return ids, valid, x, lp, bad


@triton.jit
def _sorted_ids(ids, valid, V):
    """The cached ids in ascending order as int32, V in place of lanes past k and bad ids (no
    column has it)."""
    return tl.sort(tl.where(valid, ids, V).to(tl.int32))


@triton.jit
def _full_lse(l_out, x, temp, inv_t):
    """From T lse(x/T) over the columns outside K (l_out) and the k gathered logits x: T lse(x/T)
    over all columns, and q_raw = e^((l_out - that) / T), the student's mass outside K, with the
    relative precision of l_out (no 1 - sum q_K)."""
    m = tl.maximum(l_out, tl.max(x, 0))
    ref = tl.where(m == NEG_INF, 0.0, m)
    s_out = tl.exp((l_out - ref) * inv_t)
    s_all = s_out + tl.sum(tl.exp((x - ref) * inv_t), 0)
    return ref + temp * tl.log(s_all), s_out / s_all


@triton.jit
def _log1p(x):
    """log(1 + x) to a few ulp for x > -1 (Goldberg's log(u) x / (u - 1), u = 1 + x rounded):
    the log of a tail mass 1 - s stays accurate where s is small."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / (u - 1.0)))


@triton.jit
def _lse_k(v, temp, inv_t):
    """T lse(v / T) over a block (logit units), -inf for a block of -inf."""
    m = tl.max(v, 0)
    ref = tl.where(m == NEG_INF, 0.0, m)
    lse = ref + temp * tl.log(tl.sum(tl.exp((v - ref) * inv_t), 0))
    return tl.where(m == NEG_INF, NEG_INF, lse)


@triton.jit
def _bins(x, lp, tla, q_raw, temp, inv_t, TAIL: tl.constexpr):
    """The bins of the tail mode (docs/design.md §11): the k bins' log-probabilities lP, lQ and
    the student's full-vocabulary probabilities q at the ids, and for the bucket's tail bin
    lP_t, lQ_t = log q_eff, q_eff = max(q_raw, TAIL_FLOOR) (its derivative taken straight
    through the floor). tla: T lse(x/T) over all columns (_full_lse)."""
    lq = (x - tla) * inv_t
    q = tl.exp(lq)
    q_eff = tl.maximum(q_raw, TAIL_FLOOR)
    if TAIL == BUCKET:
        lP = lp
        lQ = lq
        lP_t = _log1p(-tl.minimum(tl.sum(tl.exp(lp), 0), 1.0 - TAIL_FLOOR))
        lQ_t = tl.log(q_eff)
    else:
        lP = lp - _lse_k(lp, 1.0, 1.0)
        if TAIL == RENORMALIZE:
            # (x - T lse_K(x/T)) / T: no full-vocabulary term, -inf when every x_K is -inf.
            tlk = _lse_k(x, temp, inv_t)
            lQ = tl.where(tlk == NEG_INF, NEG_INF, (x - tlk) * inv_t)
        else:  # IGNORE: q not renormalized
            lQ = lq
        lP_t = tl.zeros((), tl.float32)
        lQ_t = tl.zeros((), tl.float32)
    return lP, lQ, q, q_eff, lP_t, lQ_t


@triton.jit
def _log_ratio(lead, partner):
    """lead - partner clamped to the fp32 range (no inf * 0 where it overflows)."""
    return tl.minimum(tl.maximum(lead - partner, -MAX_FLOAT), MAX_FLOAT)


@triton.jit
def _bin_terms(lP, lQ, mix, log_w1, log_w2, DIV: tl.constexpr):
    """Per bin (block or scalar): its share d of D, and g = dD/dlQ (docs/design.md §11). A bin
    whose leading probability is 0 (log <= LOG_MIN) adds 0; a live lead against a -inf partner
    makes kl and reverse_kl +inf. Mixture weights enter as host-computed logs."""
    P = tl.exp(lP)
    Q = tl.exp(lQ)
    if DIV == KL:
        d = tl.where(lP > LOG_MIN, tl.where(lQ == NEG_INF, POS_INF, P * _log_ratio(lP, lQ)), 0.0)
        g = -P
    elif DIV == REVERSE_KL:
        r = _log_ratio(lQ, lP)
        d = tl.where(lQ > LOG_MIN, tl.where(lP == NEG_INF, POS_INF, Q * r), 0.0)
        g = tl.where(Q > 0.0, Q * (r + 1.0), 0.0)
    elif DIV == JSD:
        lm = _log_mix(lP, lQ, log_w1, log_w2)
        tq = tl.where(Q > 0.0, Q * (lQ - lm), 0.0)
        d = mix * tl.where(P > 0.0, P * (lP - lm), 0.0) + (1.0 - mix) * tq
        g = (1.0 - mix) * tq
    elif DIV == TVD:
        d = 0.5 * tl.abs(P - Q)
        g = tl.where(Q > P, 0.5, tl.where(Q < P, -0.5, 0.0)) * Q
    elif DIV == SKEW_KL:
        lm = _log_mix(lP, lQ, log_w1, log_w2)
        d = tl.where(P > 0.0, P * (lP - lm), 0.0)
        g = tl.where((Q > 0.0) & (P > 0.0), -tl.exp(log_w2 + lP + lQ - lm), 0.0)
    else:  # SKEW_REVERSE_KL; the + Q: the Q bins need not sum to 1 (ignore mode)
        lm = _log_mix(lQ, lP, log_w1, log_w2)
        tq = tl.where(Q > 0.0, Q * (lQ - lm), 0.0)
        d = tq
        g = tl.where(Q > 0.0, tq + Q - tl.exp(log_w1 + 2.0 * lQ - lm), 0.0)
    return d, g


@triton.jit
def _sparse_fwd_kernel(
    S,
    ID,
    LP,
    L,
    W,
    LOSS,
    STATS,
    stride_s,
    stride_i,
    stride_l,
    V,
    K,
    inv_t,
    temp,
    kd_w,
    ce_w,
    mix,
    log_w1,
    log_w2,
    ignore_index,
    s_scale,
    s_cap,
    DIV: tl.constexpr,
    TAIL: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    HAS_KD: tl.constexpr,
    HAS_CE: tl.constexpr,
    S_CAP: tl.constexpr,
    ALIGN: tl.constexpr,
    KP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    w, y = _row_weight(L, W, row, ignore_index, HAS_LABELS, HAS_WEIGHTS)
    base, pad, lo, hi = _row_span(row, stride_s, V, ALIGN)
    s_row = S + base
    loss = tl.zeros((), tl.float32)
    l_out = tl.zeros((), tl.float32)  # the stats' T lse(x/T) outside K: logit units
    lse_c = tl.zeros((), tl.float32)
    d = tl.zeros((), tl.float32)
    if w != 0.0:
        sid = tl.zeros((KP,), tl.int32)
        if HAS_KD:
            ids, valid, x, lp, bad = _gather(
                s_row, ID, LP, row, stride_i, stride_l, pad, K, V, s_scale, s_cap, S_CAP, KP
            )
            sid = _sorted_ids(ids, valid, V)
        m_a, s_a, m_c, s_c = _lse_row(
            s_row, pad, lo, hi, V, inv_t, s_scale, s_cap, sid, HAS_KD, HAS_CE, S_CAP, ALIGN,
            KP, BLOCK,
        )  # fmt: skip
        if HAS_KD:
            l_out = m_a + temp * tl.log(s_a)  # -inf when no column is outside K
            tla, q_raw = _full_lse(l_out, x, temp, inv_t)
            lP, lQ, _, _, lP_t, lQ_t = _bins(x, lp, tla, q_raw, temp, inv_t, TAIL)
            d_k, _ = _bin_terms(lP, lQ, mix, log_w1, log_w2, DIV)
            d = tl.sum(d_k, 0)
            if TAIL == BUCKET:
                d_t, _ = _bin_terms(lP_t, lQ_t, mix, log_w1, log_w2, DIV)
                d += tl.where(K < V, d_t, 0.0)  # k = V: no tail bin
            d = tl.where(bad, float("nan"), d)
            loss = kd_w * (temp * temp * d)  # kd_w T^2 can underflow (a subnormal kd_w)
        if HAS_CE:
            lse_c = m_c + tl.log(s_c)
            valid = (y >= 0) & (y < V)
            xy = _load_x(s_row + pad, y, valid, s_scale, s_cap, S_CAP)
            # (m_c - c_y) + log s_c: exact where c_y is near the max, at any magnitude.
            loss += ce_w * tl.where(valid, (m_c - xy) + tl.log(s_c), float("nan"))
        loss = w * loss
    tl.store(LOSS + row, loss)
    tl.store(STATS + row * 3 + 0, l_out)
    tl.store(STATS + row * 3 + 1, lse_c)
    tl.store(STATS + row * 3 + 2, d)


@triton.jit
def _tile_grad(
    x, c, label, tla, lse_c, inv_t, kd_a, ce_scale, s_scale, s_cap, TAIL: tl.constexpr,
    HAS_KD: tl.constexpr, HAS_CE: tl.constexpr, S_CAP: tl.constexpr
):  # fmt: skip
    """d loss / d z of one streamed tile, as if no column were in K: ce part + kd_a q_j, kd_a
    = w grad_loss kd_weight T A (0 without a KD gradient; no KD part for renormalize)."""
    grad = tl.zeros_like(x)
    if HAS_KD and TAIL != RENORMALIZE:
        grad += kd_a * tl.exp((x - tla) * inv_t)
    if HAS_CE:
        grad += ce_scale * (tl.exp(x - lse_c) - tl.where(c == label, 1.0, 0.0))
    return grad * _dtransform(x, s_scale, s_cap, S_CAP)


@triton.jit
def _sparse_bwd_kernel(
    S,
    ID,
    LP,
    L,
    W,
    STATS,
    GL,
    G,
    stride_s,
    stride_i,
    stride_l,
    stride_g,
    V,
    K,
    inv_t,
    temp,
    kd_w,
    ce_w,
    mix,
    log_w1,
    log_w2,
    ignore_index,
    s_scale,
    s_cap,
    DIV: tl.constexpr,
    TAIL: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    HAS_KD: tl.constexpr,
    HAS_CE: tl.constexpr,
    S_CAP: tl.constexpr,
    ALIGN: tl.constexpr,
    KP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    w, y = _row_weight(L, W, row, ignore_index, HAS_LABELS, HAS_WEIGHTS)
    base, pad, lo, hi = _row_span(row, stride_s, V, ALIGN)
    s_row = S + base
    g_row = G + _row_base(row, stride_g, pad, ALIGN)
    if w != 0.0:
        scale = w * tl.load(GL + row)
        lse_c = tl.load(STATS + row * 3 + 1)
        tla = tl.zeros((), tl.float32)
        kd_scale = scale * kd_w * temp
        ce_scale = scale * ce_w
        label = y + pad
        kd_a = tl.zeros((), tl.float32)
        if HAS_KD:
            # The k columns of K first: grad may be the student itself, so they are read (and
            # their full gradient formed) before the stream overwrites the row.
            ids, valid, x, lp, bad = _gather(
                s_row, ID, LP, row, stride_i, stride_l, pad, K, V, s_scale, s_cap, S_CAP, KP
            )
            tla, q_raw = _full_lse(tl.load(STATS + row * 3 + 0), x, temp, inv_t)
            lP, lQ, q, q_eff, lP_t, lQ_t = _bins(x, lp, tla, q_raw, temp, inv_t, TAIL)
            _, g = _bin_terms(lP, lQ, mix, log_w1, log_w2, DIV)
            g_k = tl.sum(g, 0)
            # A row whose D is +inf (or beyond fp32) gets no KD gradient; a bad id: NaN.
            kd_on = tl.load(STATS + row * 3 + 2) != POS_INF
            kd_scale = tl.where(bad, float("nan"), tl.where(kd_on, kd_scale, 0.0))
            if TAIL == RENORMALIZE:
                dd = g - g_k * tl.exp(lQ)
            else:
                # dD/da_j = q_j A outside K and g_j - q_j r in K, r = G_K + g_t q_raw / q_eff,
                # A = g_t / q_eff - r: the spec's q_j A + g_j - q_j g_t / q_eff without its two
                # terms of size q_j g_t / q_eff (up to 2^14 q_j) that cancel in fp32.
                r = g_k
                if TAIL == BUCKET:
                    _, g_t = _bin_terms(lP_t, lQ_t, mix, log_w1, log_w2, DIV)
                    g_t = tl.where(K < V, g_t, 0.0)  # k = V: no tail bin
                    r += g_t * (q_raw / q_eff)
                    a = g_t / q_eff - r
                else:  # IGNORE: no tail bin
                    a = -r
                dd = g - q * r
                kd_a = kd_scale * tl.where(kd_on, a, 0.0)
            grad_k = tl.where(kd_on, kd_scale * dd, 0.0)
            if HAS_CE:
                grad_k += ce_scale * (tl.exp(x - lse_c) - tl.where(ids == y, 1.0, 0.0))
            grad_k = grad_k * _dtransform(x, s_scale, s_cap, S_CAP)
            tl.debug_barrier()  # every thread's gathers done before any store to the row
        offs = tl.arange(0, BLOCK)
        for start in range(lo, hi, BLOCK):
            c = start + offs
            x_c = _load_x(s_row, c, c < hi, s_scale, s_cap, S_CAP)
            grad = _tile_grad(
                x_c, c, label, tla, lse_c, inv_t, kd_a, ce_scale, s_scale, s_cap, TAIL, HAS_KD,
                HAS_CE, S_CAP,
            )  # fmt: skip
            tl.store(g_row + c, grad.to(G.dtype.element_ty), mask=c < hi)
        if ALIGN > 1:
            edge, in_row = _edge_cols(pad, lo, hi, V, ALIGN)
            x_c = _load_x(s_row, edge, in_row, s_scale, s_cap, S_CAP)
            grad = _tile_grad(
                x_c, edge, label, tla, lse_c, inv_t, kd_a, ce_scale, s_scale, s_cap, TAIL,
                HAS_KD, HAS_CE, S_CAP,
            )  # fmt: skip
            tl.store(g_row + edge, grad.to(G.dtype.element_ty), mask=in_row)
        if HAS_KD:
            # ids are distinct: one store of each K column's full value, after the stream's.
            tl.debug_barrier()
            tl.store(g_row + pad + ids, grad_k.to(G.dtype.element_ty), mask=valid)
    else:
        _zero_row(g_row, pad, lo, hi, V, ALIGN, BLOCK)


def launch_meta(
    student: torch.Tensor,
    ids: torch.Tensor,
    labels: torch.Tensor | None,
    weights: torch.Tensor | None,
    args: SparseKernelArgs,
    grad: torch.Tensor | None = None,
) -> dict:
    """Keyword arguments of either kernel beyond its tensors and strides: the scalars of
    ``args``, the constexpr flags and the launch configuration (``grad`` for the backward).
    The ids are gathered, not streamed: they do not enter the row alignment."""
    v, k = student.shape[1], ids.shape[1]
    has_kd = args.kd_weight != 0.0
    config = launch_config(v)
    return dict(
        V=v,
        K=k,
        inv_t=1.0 / args.temperature,
        temp=args.temperature,
        kd_w=args.kd_weight,
        ce_w=args.ce_weight,
        mix=args.mix,
        **mixture_logs(args.mix),
        ignore_index=args.ignore_index,
        s_scale=args.student_scale,
        s_cap=args.student_softcap,
        DIV=args.divergence,
        TAIL=args.tail,
        HAS_LABELS=labels is not None,
        HAS_WEIGHTS=weights is not None,
        HAS_KD=has_kd,
        HAS_CE=args.ce_weight != 0.0 and labels is not None,
        S_CAP=args.student_softcap != 0.0,
        ALIGN=_alignment(student, () if grad is None else (grad,)),
        KP=triton.next_power_of_2(k) if has_kd else 1,  # no KD: the ids are not read
        BLOCK=config.block,
        num_warps=config.num_warps,
    )


def fwd_args(student, ids, logprobs, labels, weights, loss, stats) -> tuple:
    """Positional arguments of _sparse_fwd_kernel (absent optional tensors replaced by a
    tensor the kernel does not read)."""
    return (
        student,
        ids,
        logprobs,
        loss if labels is None else labels,
        loss if weights is None else weights,
        loss,
        stats,
        student.stride(0),
        ids.stride(0),
        logprobs.stride(0),
    )


def bwd_args(student, ids, logprobs, labels, weights, stats, grad_loss, grad) -> tuple:
    """Positional arguments of _sparse_bwd_kernel."""
    return (
        student,
        ids,
        logprobs,
        stats if labels is None else labels,
        stats if weights is None else weights,
        stats,
        grad_loss,
        grad,
        student.stride(0),
        ids.stride(0),
        logprobs.stride(0),
        grad.stride(0),
    )


def _check(student: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor) -> None:
    for name, t in (("student logits", student), ("ids", ids), ("logprobs", logprobs)):
        if t.shape[1] > 1 and t.stride(1) != 1:
            raise ValueError(f"{name} need a contiguous last dimension, got strides {t.stride()}")


def sparse_kd_loss_fwd(student, ids, logprobs, labels, weights, *args):
    """Launcher of the forward: (loss [N] fp32, stats [N, 3] fp32 = T lse(x/T) over the columns
    outside K, lse(x), D). See docs/design.md §11."""
    args = SparseKernelArgs(*args)
    _check(student, ids, logprobs)
    n = student.shape[0]
    loss = torch.empty(n, dtype=torch.float32, device=student.device)
    stats = torch.empty((n, 3), dtype=torch.float32, device=student.device)
    if n:
        with on_device(student.device):
            _sparse_fwd_kernel[(n,)](
                *fwd_args(student, ids, logprobs, labels, weights, loss, stats),
                **launch_meta(student, ids, labels, weights, args),
            )
    return loss, stats


def sparse_kd_loss_bwd(student, ids, logprobs, labels, weights, stats, grad_loss, *args_and_grad):
    """Launcher of the backward: writes the gradient into the last argument (which may be
    ``student``)."""
    *args, grad = args_and_grad
    args = SparseKernelArgs(*args)
    _check(student, ids, logprobs)
    n = student.shape[0]
    if n:
        with on_device(student.device):
            _sparse_bwd_kernel[(n,)](
                *bwd_args(student, ids, logprobs, labels, weights, stats, grad_loss, grad),
                **launch_meta(student, ids, labels, weights, args, grad),
            )
