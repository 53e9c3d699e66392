"""Triton kernels of the fused KD loss on logits, and their launchers (docs/design.md §5).

One program per row. The forward streams the row in BLOCK-wide tiles with an online softmax
(running max and sum of z_s/T, z_t/T and z_s, and the KL sums rescaled as the max moves); the
divergences that are not plain KL take a second pass once the log-sum-exps are known. The
backward streams the row once more and writes the gradient. Nothing of size [N, V] is
allocated but the gradient. Math and contract: docs/design.md §1-§2; truth: fastkd/reference.py.

Every row is read in 16-byte vectors whatever its length (GPT-2's V = 50257 included): tiles
start at the 16-byte boundary at or before the row's first element, the aligned part of the row
goes through full-vector loads and stores, and the few columns before the first and after the
last boundary go through one small edge tile (``_row_span``, ``_edge_cols``).
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from fastkd._options import DIVERGENCE_CODES, KernelArgs

KL: tl.constexpr = tl.constexpr(DIVERGENCE_CODES["kl"])
REVERSE_KL: tl.constexpr = tl.constexpr(DIVERGENCE_CODES["reverse_kl"])
JSD: tl.constexpr = tl.constexpr(DIVERGENCE_CODES["jsd"])
TVD: tl.constexpr = tl.constexpr(DIVERGENCE_CODES["tvd"])
SKEW_KL: tl.constexpr = tl.constexpr(DIVERGENCE_CODES["skew_kl"])
SKEW_REVERSE_KL: tl.constexpr = tl.constexpr(DIVERGENCE_CODES["skew_reverse_kl"])

NEG_INF: tl.constexpr = tl.constexpr(float("-inf"))
POS_INF: tl.constexpr = tl.constexpr(float("inf"))
MAX_FLOAT: tl.constexpr = tl.constexpr(3.4028234663852886e38)  # the largest finite fp32
# ln 2^-1075: a log-probability at or below it is a probability of exactly 0 (csrc/kd_math.h
# kLogMin, docs/design.md §3).
LOG_MIN: tl.constexpr = tl.constexpr(-745.1332191019412)
VECTOR_BYTES = 16  # one 128-bit load or store


@triton.jit
def _transform(z, scale, cap, HAS_CAP: tl.constexpr):
    """logit_scale then softcap: cap * tanh(x / cap), keeping -inf (a masked entry)."""
    x = z * scale
    if HAS_CAP:
        y = tl.abs(x) / cap
        e = tl.exp(-2.0 * y)
        t = (1.0 - e) / (1.0 + e)
        x = tl.where(x == NEG_INF, x, cap * tl.where(x < 0, -t, t))
    return x


@triton.jit
def _dtransform(x, scale, cap, HAS_CAP: tl.constexpr):
    """d x / d z of _transform, written in terms of its output x."""
    if HAS_CAP:
        r = x / cap
        d = scale * (1.0 - r * r)
    else:
        d = scale + tl.zeros_like(x)
    return tl.where(x == NEG_INF, 0.0, d)


@triton.jit
def _online(m, s, x, inv_t):
    """Merge tile x (logit units) into a running (max, sum of exp((x - max) / T)); returns the
    rescale factor of the old sums and the (finite) reference point used for this tile. x / T
    itself is never formed: it overflows where T < 1 and |x| is near the fp32 maximum."""
    m_new = tl.maximum(m, tl.max(x, 0))
    ref = tl.where(m_new == NEG_INF, 0.0, m_new)
    rescale = tl.exp((m - ref) * inv_t)
    s = s * rescale + tl.sum(tl.exp((x - ref) * inv_t), 0)
    return m_new, s, rescale, ref


@triton.jit
def _one_pass_term(lead, partner, e_lead):
    """kl's (reverse_kl's) share e_lead (lead - partner) of pass 1, in logit units; 0 where the
    partner is -inf (_masked_lead decides those columns), the difference clamped to the fp32
    range (csrc/kd_math.h one_pass_term, kSafe)."""
    d = tl.minimum(tl.maximum(lead - partner, -MAX_FLOAT), MAX_FLOAT)
    return tl.where(partner > NEG_INF, e_lead * d, 0.0)


@triton.jit
def _masked_lead(lead, partner):
    """The lead where the partner is -inf, else -inf: its max says whether the divergence is +inf
    (_partner_masked_live)."""
    return tl.where(partner > NEG_INF, NEG_INF, lead)


@triton.jit
def _partner_masked_live(mi, m, s, inv_t):
    """Whether a column with a partner of -inf has a lead probability above 0: mi the largest such
    lead, m the lead's max, s its sum of exp((x - m) / T)."""
    return (mi - m) * inv_t - tl.log(s) > LOG_MIN


@triton.jit
def _rescale(acc, r):
    """acc * r, except that an infinite sum stays infinite where r underflows to 0."""
    return tl.where(tl.abs(acc) == POS_INF, acc, acc * r)


@triton.jit
def _log_mix(l1, l2, log_w1, log_w2):
    """log(w1 e^l1 + w2 e^l2), -inf when both are -inf."""
    u = l1 + log_w1
    v = l2 + log_w2
    hi = tl.maximum(u, v)
    lo = tl.minimum(u, v)
    safe = tl.where(hi == NEG_INF, 0.0, hi)
    return tl.where(hi == NEG_INF, NEG_INF, safe + tl.log(1.0 + tl.exp(lo - safe)))


@triton.jit
def _row_span(row, stride, VS, ALIGN: tl.constexpr):
    """Where the aligned part of a row lies (docs/design.md §5).

    Columns are counted from the ALIGN-element (16-byte) boundary at or before the row's first
    element, which sits ``pad`` columns past it: the row is [pad, VS + pad). [lo, hi) is its
    aligned part (whole vectors), the rest is [pad, lo) and [hi, VS + pad), each under ALIGN
    columns. Returns the element offset of the boundary from the tensor's start, pad, lo, hi.
    With ALIGN = 1 (a row layout that is not aligned) the aligned part is the whole row.
    """
    start = row * stride
    pad = (start % ALIGN).to(tl.int32)
    lo = tl.multiple_of((pad + ALIGN - 1) // ALIGN * ALIGN, ALIGN)
    hi = tl.multiple_of(tl.maximum(lo, (VS + pad) // ALIGN * ALIGN), ALIGN)
    return tl.multiple_of(start - pad, ALIGN), pad, lo, hi


@triton.jit
def _row_base(row, stride, pad, ALIGN: tl.constexpr):
    """Element offset of another tensor's row boundary; the launcher only picks ALIGN > 1 when
    every row stride is congruent modulo ALIGN, so the pad is the student's."""
    return tl.multiple_of(row * stride - pad, ALIGN)


@triton.jit
def _edge_cols(pad, lo, hi, VS, ALIGN: tl.constexpr):
    """The row's columns outside its aligned part, [pad, lo) and [hi, VS + pad), as one tile of
    2 * ALIGN columns (first half head, second half tail) and the mask of those in the row."""
    i = tl.arange(0, 2 * ALIGN)
    head = i < ALIGN
    c = tl.where(head, i, hi + i - ALIGN)
    in_row = tl.where(head, (c >= pad) & (c < lo), True) & (c < VS + pad)
    return c, in_row


@triton.jit
def _load_tile(
    s_row,
    t_row,
    c,
    in_row,
    pad,
    VT,
    KV,
    s_scale,
    s_cap,
    t_scale,
    t_cap,
    S_CAP: tl.constexpr,
    T_CAP: tl.constexpr,
    HAS_KD: tl.constexpr,
    KD_FULL: tl.constexpr,
):
    """Transformed student logits x_s at the columns c (counted as in _row_span), and x_s, x_t
    on the KD columns (a and b of docs/design.md §1 times T; -inf elsewhere: outside KV, or past
    the teacher's vocabulary; everywhere without a KD term, whose teacher is then not read), and
    the mask of the KD columns. KD_FULL (every student column is a KD column and the teacher has
    it) keeps the teacher's mask the student's, so its loads stay vectors too."""
    zs = tl.load(s_row + c, mask=in_row, other=NEG_INF).to(tl.float32)
    xs = _transform(zs, s_scale, s_cap, S_CAP)
    if HAS_KD:
        if KD_FULL:
            kd = in_row
            t_mask = in_row
        else:
            kd = in_row & (c - pad < KV)
            t_mask = kd & (c - pad < VT)
        zt = tl.load(t_row + c, mask=t_mask, other=NEG_INF).to(tl.float32)
        b = _transform(zt, t_scale, t_cap, T_CAP)
    else:
        kd = c < 0
        b = tl.full((1,), NEG_INF, tl.float32)
    a = tl.where(kd, xs, NEG_INF)
    return xs, a, b, kd


@triton.jit
def _pass1(
    m_a, s_a, m_b, s_b, m_c, s_c, acc, mi, xs, a, b, inv_t, DIV: tl.constexpr,
    HAS_KD: tl.constexpr, HAS_CE: tl.constexpr
):  # fmt: skip
    """Merge one tile into the forward's running sums: online log-sum-exps of a, b and x_s
    (logit units), acc = sum e^((x_t-m_b)/T)(x_t-x_s) for kl, sum e^((x_s-m_a)/T)(x_s-x_t) for
    reverse_kl, and mi, the max of _masked_lead."""
    if HAS_KD:
        m_a, s_a, r_a, ref_a = _online(m_a, s_a, a, inv_t)
        m_b, s_b, r_b, ref_b = _online(m_b, s_b, b, inv_t)
        if DIV == KL:
            term = _one_pass_term(b, a, tl.exp((b - ref_b) * inv_t))
            acc = _rescale(acc, r_b) + tl.sum(term, 0)
            mi = tl.maximum(mi, tl.max(_masked_lead(b, a), 0))
        if DIV == REVERSE_KL:
            term = _one_pass_term(a, b, tl.exp((a - ref_a) * inv_t))
            acc = _rescale(acc, r_a) + tl.sum(term, 0)
            mi = tl.maximum(mi, tl.max(_masked_lead(a, b), 0))
    if HAS_CE:
        m_c, s_c, _, _ = _online(m_c, s_c, xs, 1.0)
    return m_a, s_a, m_b, s_b, m_c, s_c, acc, mi


@triton.jit
def _pass2(d, g, a, b, tla, tlb, inv_t, mix, log_w1, log_w2, DIV: tl.constexpr):
    """Add one tile to D and G of the divergences that need the log-sum-exps first (tla, tlb:
    T lse(a), T lse(b))."""
    lq = (a - tla) * inv_t
    lp = (b - tlb) * inv_t
    q = tl.exp(lq)
    p = tl.exp(lp)
    if DIV == JSD:
        lm = _log_mix(lp, lq, log_w1, log_w2)
        tq = tl.where(q > 0.0, q * (lq - lm), 0.0)
        tp = tl.where(p > 0.0, p * (lp - lm), 0.0)
        d += mix * tl.sum(tp, 0) + (1.0 - mix) * tl.sum(tq, 0)
        g += tl.sum(tq, 0)
    elif DIV == TVD:
        h = tl.where(q > p, 0.5, tl.where(q < p, -0.5, 0.0))
        d += 0.5 * tl.sum(tl.abs(p - q), 0)
        g += tl.sum(q * h, 0)
    elif DIV == SKEW_KL:
        lm = _log_mix(lp, lq, log_w1, log_w2)
        d += tl.sum(tl.where(p > 0.0, p * (lp - lm), 0.0), 0)
        qg = -tl.exp(log_w2 + lq + lp - lm)  # the weight as a log: a tiny mix stays finite
        g += tl.sum(tl.where((q > 0.0) & (p > 0.0), qg, 0.0), 0)
    else:  # SKEW_REVERSE_KL
        lm = _log_mix(lq, lp, log_w1, log_w2)
        tq = tl.where(q > 0.0, q * (lq - lm), 0.0)
        d += tl.sum(tq, 0)
        qg = tq - tl.exp(log_w1 + 2.0 * lq - lm)
        g += tl.sum(tl.where(q > 0.0, qg, 0.0), 0)
    return d, g


@triton.jit
def _grad(
    xs, a, b, kd, is_label, tla, tlb, inv_t, lse_c, big_g, mix, log_w1, log_w2, kd_scale,
    ce_scale, s_scale, s_cap, DIV: tl.constexpr, HAS_KD: tl.constexpr, HAS_CE: tl.constexpr,
    S_CAP: tl.constexpr
):  # fmt: skip
    """d loss / d z_s of one tile (docs/design.md §2), in fp32. A row whose D is +inf (G = D
    for kl and reverse_kl) gets no KD gradient (docs/design.md §3)."""
    lq = (a - tla) * inv_t
    lp = (b - tlb) * inv_t
    q = tl.exp(lq)
    p = tl.exp(lp)
    if not HAS_KD:
        dd = tl.zeros_like(q)
    elif DIV == KL:
        dd = q - p
    elif DIV == REVERSE_KL:
        dd = tl.where(q > 0.0, q * (lq - lp - big_g), 0.0)
    elif DIV == JSD:
        lm = _log_mix(lp, lq, log_w1, log_w2)
        dd = (1.0 - mix) * tl.where(q > 0.0, q * (lq - lm - big_g), 0.0)
    elif DIV == TVD:
        h = tl.where(q > p, 0.5, tl.where(q < p, -0.5, 0.0))
        dd = q * (h - big_g)
    elif DIV == SKEW_KL:
        lm = _log_mix(lp, lq, log_w1, log_w2)
        qg = tl.where((q > 0.0) & (p > 0.0), -tl.exp(log_w2 + lq + lp - lm), 0.0)
        dd = qg - q * big_g
    else:  # SKEW_REVERSE_KL
        lm = _log_mix(lq, lp, log_w1, log_w2)
        qg = q * (lq - lm) - tl.exp(log_w1 + 2.0 * lq - lm)
        dd = tl.where(q > 0.0, qg - q * big_g, 0.0)
    grad = kd_scale * tl.where(kd, tl.where(big_g != POS_INF, dd, 0.0), 0.0)
    if HAS_CE:
        grad += ce_scale * (tl.exp(xs - lse_c) - tl.where(is_label, 1.0, 0.0))
    return grad * _dtransform(xs, s_scale, s_cap, S_CAP)


@triton.jit
def _zero_row(g_row, pad, lo, hi, VS, ALIGN: tl.constexpr, BLOCK: tl.constexpr):
    """Write a zero gradient row (a row of weight 0, which is not read)."""
    zero = tl.zeros((BLOCK,), g_row.dtype.element_ty)
    for start in range(lo, hi, BLOCK):
        c = start + tl.arange(0, BLOCK)
        tl.store(g_row + c, zero, mask=c < hi)
    if ALIGN > 1:
        edge, in_row = _edge_cols(pad, lo, hi, VS, ALIGN)
        tl.store(g_row + edge, tl.zeros((2 * ALIGN,), g_row.dtype.element_ty), mask=in_row)


@triton.jit
def _row_weight(L, W, row, ignore_index, HAS_LABELS: tl.constexpr, HAS_WEIGHTS: tl.constexpr):
    w = 1.0
    if HAS_WEIGHTS:
        w = tl.load(W + row).to(tl.float32)
    y = 0
    if HAS_LABELS:
        y = tl.load(L + row)
        w = tl.where(y == ignore_index, 0.0, w)
    return w, y


@triton.jit
def _pass1_row(
    s_row, t_row, pad, lo, hi, VS, VT, KV, inv_t, s_scale, s_cap, t_scale, t_cap,
    DIV: tl.constexpr, HAS_KD: tl.constexpr, HAS_CE: tl.constexpr, S_CAP: tl.constexpr,
    T_CAP: tl.constexpr, KD_FULL: tl.constexpr, ALIGN: tl.constexpr, BLOCK: tl.constexpr
):  # fmt: skip
    """The forward's first pass over a row: its aligned part, then its edge tile."""
    m_a = tl.full((), NEG_INF, tl.float32)
    s_a = tl.zeros((), tl.float32)
    m_b = tl.full((), NEG_INF, tl.float32)
    s_b = tl.zeros((), tl.float32)
    m_c = tl.full((), NEG_INF, tl.float32)
    s_c = tl.zeros((), tl.float32)
    acc = tl.zeros((), tl.float32)
    mi = tl.full((), NEG_INF, tl.float32)
    for start in range(lo, hi, BLOCK):
        c = start + tl.arange(0, BLOCK)
        xs, a, b, _ = _load_tile(
            s_row, t_row, c, c < hi, pad, VT, KV, s_scale, s_cap, t_scale, t_cap,
            S_CAP, T_CAP, HAS_KD, KD_FULL,
        )  # fmt: skip
        m_a, s_a, m_b, s_b, m_c, s_c, acc, mi = _pass1(
            m_a, s_a, m_b, s_b, m_c, s_c, acc, mi, xs, a, b, inv_t, DIV, HAS_KD, HAS_CE
        )
    if ALIGN > 1:
        edge, in_row = _edge_cols(pad, lo, hi, VS, ALIGN)
        xs, a, b, _ = _load_tile(
            s_row, t_row, edge, in_row, pad, VT, KV, s_scale, s_cap, t_scale, t_cap,
            S_CAP, T_CAP, HAS_KD, KD_FULL,
        )  # fmt: skip
        m_a, s_a, m_b, s_b, m_c, s_c, acc, mi = _pass1(
            m_a, s_a, m_b, s_b, m_c, s_c, acc, mi, xs, a, b, inv_t, DIV, HAS_KD, HAS_CE
        )
    return m_a, s_a, m_b, s_b, m_c, s_c, acc, mi


@triton.jit
def _pass2_row(
    s_row, t_row, pad, lo, hi, VS, VT, KV, inv_t, s_scale, s_cap, t_scale, t_cap, tla, tlb,
    mix, log_w1, log_w2, DIV: tl.constexpr, S_CAP: tl.constexpr, T_CAP: tl.constexpr,
    KD_FULL: tl.constexpr, ALIGN: tl.constexpr, BLOCK: tl.constexpr
):  # fmt: skip
    """The forward's second pass over a row (jsd, tvd, skew divergences): D and G."""
    d = tl.zeros((), tl.float32)
    g = tl.zeros((), tl.float32)
    for start in range(lo, hi, BLOCK):
        c = start + tl.arange(0, BLOCK)
        _, a, b, _ = _load_tile(
            s_row, t_row, c, c < hi, pad, VT, KV, s_scale, s_cap, t_scale, t_cap,
            S_CAP, T_CAP, True, KD_FULL,
        )  # fmt: skip
        d, g = _pass2(d, g, a, b, tla, tlb, inv_t, mix, log_w1, log_w2, DIV)
    if ALIGN > 1:
        edge, in_row = _edge_cols(pad, lo, hi, VS, ALIGN)
        _, a, b, _ = _load_tile(
            s_row, t_row, edge, in_row, pad, VT, KV, s_scale, s_cap, t_scale, t_cap,
            S_CAP, T_CAP, True, KD_FULL,
        )  # fmt: skip
        d, g = _pass2(d, g, a, b, tla, tlb, inv_t, mix, log_w1, log_w2, DIV)
    return d, g


@triton.jit
def _kd_fwd_kernel(
    S,
    T,
    L,
    W,
    LOSS,
    STATS,
    stride_s,
    stride_t,
    VS,
    VT,
    KV,
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
    t_scale,
    t_cap,
    DIV: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    HAS_KD: tl.constexpr,
    HAS_CE: tl.constexpr,
    S_CAP: tl.constexpr,
    T_CAP: tl.constexpr,
    KD_FULL: tl.constexpr,
    ALIGN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    w, y = _row_weight(L, W, row, ignore_index, HAS_LABELS, HAS_WEIGHTS)
    base, pad, lo, hi = _row_span(row, stride_s, VS, ALIGN)
    s_row = S + base
    t_row = T + _row_base(row, stride_t, pad, ALIGN)
    loss = tl.zeros((), tl.float32)
    tla = tl.zeros((), tl.float32)  # the stats' T lse(a), T lse(b): logit units
    tlb = tl.zeros((), tl.float32)
    lse_c = tl.zeros((), tl.float32)
    g = tl.zeros((), tl.float32)
    if w != 0.0:
        m_a, s_a, m_b, s_b, m_c, s_c, acc, mi = _pass1_row(
            s_row, t_row, pad, lo, hi, VS, VT, KV, inv_t, s_scale, s_cap, t_scale, t_cap, DIV,
            HAS_KD, HAS_CE, S_CAP, T_CAP, KD_FULL, ALIGN, BLOCK,
        )  # fmt: skip
        d = tl.zeros((), tl.float32)
        if HAS_KD:
            tla = m_a + temp * tl.log(s_a)
            tlb = m_b + temp * tl.log(s_b)
            # lse(a) - lse(b) as (m_a - m_b) / T + log(s_a / s_b); G = D for kl and reverse_kl
            # (the backward tests it for +inf).
            if DIV == KL:
                d = acc * inv_t / s_b + (m_a - m_b) * inv_t + tl.log(s_a / s_b)
                d = tl.where(_partner_masked_live(mi, m_b, s_b, inv_t), POS_INF, d)
                g = d
            elif DIV == REVERSE_KL:
                d = acc * inv_t / s_a + (m_b - m_a) * inv_t + tl.log(s_b / s_a)
                d = tl.where(_partner_masked_live(mi, m_a, s_a, inv_t), POS_INF, d)
                g = d
            else:
                d, g = _pass2_row(
                    s_row, t_row, pad, lo, hi, VS, VT, KV, inv_t, s_scale, s_cap, t_scale,
                    t_cap, tla, tlb, mix, log_w1, log_w2, DIV, S_CAP, T_CAP, KD_FULL, ALIGN,
                    BLOCK,
                )  # fmt: skip
        loss = kd_w * (temp * temp * d)  # kd_w T^2 can underflow (a subnormal kd_w), times inf
        if HAS_CE:
            lse_c = m_c + tl.log(s_c)
            valid = (y >= 0) & (y < VS)
            zy = tl.load(s_row + pad + y, mask=valid, other=0.0).to(tl.float32)
            xy = _transform(zy, s_scale, s_cap, S_CAP)
            # (m_c - c_y) + log s_c: exact where c_y is near the max, at any magnitude.
            loss += ce_w * tl.where(valid, (m_c - xy) + tl.log(s_c), float("nan"))
        loss = w * loss
    tl.store(LOSS + row, loss)
    tl.store(STATS + row * 4 + 0, tla)
    tl.store(STATS + row * 4 + 1, tlb)
    tl.store(STATS + row * 4 + 2, lse_c)
    tl.store(STATS + row * 4 + 3, g)


@triton.jit
def _kd_bwd_kernel(
    S,
    T,
    L,
    W,
    STATS,
    GL,
    G,
    stride_s,
    stride_t,
    stride_g,
    VS,
    VT,
    KV,
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
    t_scale,
    t_cap,
    DIV: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    HAS_KD: tl.constexpr,
    HAS_CE: tl.constexpr,
    S_CAP: tl.constexpr,
    T_CAP: tl.constexpr,
    KD_FULL: tl.constexpr,
    ALIGN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    w, y = _row_weight(L, W, row, ignore_index, HAS_LABELS, HAS_WEIGHTS)
    base, pad, lo, hi = _row_span(row, stride_s, VS, ALIGN)
    s_row = S + base
    t_row = T + _row_base(row, stride_t, pad, ALIGN)
    g_row = G + _row_base(row, stride_g, pad, ALIGN)
    offs = tl.arange(0, BLOCK)
    if w != 0.0:
        scale = w * tl.load(GL + row)
        tla = tl.load(STATS + row * 4 + 0)
        tlb = tl.load(STATS + row * 4 + 1)
        lse_c = tl.load(STATS + row * 4 + 2)
        big_g = tl.load(STATS + row * 4 + 3)
        kd_scale = scale * kd_w * temp
        ce_scale = scale * ce_w
        label = y + pad
        for start in range(lo, hi, BLOCK):
            c = start + offs
            xs, a, b, kd = _load_tile(
                s_row, t_row, c, c < hi, pad, VT, KV, s_scale, s_cap, t_scale, t_cap,
                S_CAP, T_CAP, HAS_KD, KD_FULL,
            )  # fmt: skip
            grad = _grad(
                xs, a, b, kd, c == label, tla, tlb, inv_t, lse_c, big_g, mix, log_w1, log_w2,
                kd_scale, ce_scale, s_scale, s_cap, DIV, HAS_KD, HAS_CE, S_CAP,
            )  # fmt: skip
            tl.store(g_row + c, grad.to(G.dtype.element_ty), mask=c < hi)
        if ALIGN > 1:
            edge, in_row = _edge_cols(pad, lo, hi, VS, ALIGN)
            xs, a, b, kd = _load_tile(
                s_row, t_row, edge, in_row, pad, VT, KV, s_scale, s_cap, t_scale, t_cap,
                S_CAP, T_CAP, HAS_KD, KD_FULL,
            )  # fmt: skip
            grad = _grad(
                xs, a, b, kd, edge == label, tla, tlb, inv_t, lse_c, big_g, mix, log_w1, log_w2,
                kd_scale, ce_scale, s_scale, s_cap, DIV, HAS_KD, HAS_CE, S_CAP,
            )  # fmt: skip
            tl.store(g_row + edge, grad.to(G.dtype.element_ty), mask=in_row)
    else:
        _zero_row(g_row, pad, lo, hi, VS, ALIGN, BLOCK)


class LaunchConfig(NamedTuple):
    block: int
    num_warps: int


def launch_config(vocab: int) -> LaunchConfig:
    """BLOCK and num_warps of both kernels for rows of ``vocab`` columns: the one place they are
    chosen, used by the launchers and by the ahead-of-time compile (fastkd.kernels.aot). One
    choice serves every dtype: at 4096 columns and 8 warps (16 per thread, 2-4 vectors per
    tensor) no kernel spills on sm_80 or sm_90 (at most 124 registers; bench/results/aot/)."""
    block = min(triton.next_power_of_2(vocab), 4096)
    return LaunchConfig(block, 8 if block >= 2048 else 4)


def _alignment(student: torch.Tensor, others: tuple[torch.Tensor, ...]) -> int:
    """ALIGN: columns per 16-byte vector when every row of every tensor read or written starts
    the same number of columns past a 16-byte boundary (the kernels then share one row split,
    docs/design.md §5), else 1 (element-wise access)."""
    vec = VECTOR_BYTES // student.element_size()
    phase = student.stride(0) % vec
    for t in (student, *others):
        if t.data_ptr() % VECTOR_BYTES or t.stride(0) % vec != phase:
            return 1
    return vec


def mixture_logs(mix: float) -> dict[str, float]:
    """The mixture's weights as logs (log_w1 = log mix, log_w2 = log(1 - mix)), from the host in
    double: log(mix) of a subnormal mix (skew 1e-39) is finite there, and no kernel forms it (0
    for the divergences without a mixture)."""
    return dict(
        log_w1=math.log(mix) if mix else 0.0,
        log_w2=math.log1p(-mix) if mix else 0.0,
    )


def launch_meta(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None,
    weights: torch.Tensor | None,
    args: KernelArgs,
    grad: torch.Tensor | None = None,
) -> dict:
    """Keyword arguments of either kernel beyond its tensors and strides: the scalars of
    ``args``, the constexpr flags and the launch configuration (``grad`` for the backward)."""
    vs, vt = student.shape[1], teacher.shape[1]
    has_kd = args.kd_weight != 0.0
    read = (teacher,) if has_kd else ()
    config = launch_config(vs)
    return dict(
        VS=vs,
        VT=vt,
        KV=args.kd_vocab,
        inv_t=1.0 / args.temperature,
        temp=args.temperature,
        kd_w=args.kd_weight,
        ce_w=args.ce_weight,
        mix=args.mix,
        **mixture_logs(args.mix),
        ignore_index=args.ignore_index,
        s_scale=args.student_scale,
        s_cap=args.student_softcap,
        t_scale=args.teacher_scale,
        t_cap=args.teacher_softcap,
        DIV=args.divergence,
        HAS_LABELS=labels is not None,
        HAS_WEIGHTS=weights is not None,
        HAS_KD=has_kd,
        HAS_CE=args.ce_weight != 0.0 and labels is not None,
        S_CAP=args.student_softcap != 0.0,
        T_CAP=args.teacher_softcap != 0.0,
        KD_FULL=args.kd_vocab == vs <= vt,
        ALIGN=_alignment(student, read if grad is None else (*read, grad)),
        BLOCK=config.block,
        num_warps=config.num_warps,
    )


def fwd_args(student, teacher, labels, weights, loss, stats) -> tuple:
    """Positional arguments of _kd_fwd_kernel (absent optional tensors replaced by a tensor
    the kernel does not read)."""
    return (
        student,
        teacher,
        loss if labels is None else labels,
        loss if weights is None else weights,
        loss,
        stats,
        student.stride(0),
        teacher.stride(0),
    )


def bwd_args(student, teacher, labels, weights, stats, grad_loss, grad) -> tuple:
    """Positional arguments of _kd_bwd_kernel."""
    return (
        student,
        teacher,
        stats if labels is None else labels,
        stats if weights is None else weights,
        stats,
        grad_loss,
        grad,
        student.stride(0),
        teacher.stride(0),
        grad.stride(0),
    )


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Make ``device`` current while launching: Triton launches on the current CUDA device and
    its current stream, which need not be the tensors' (student on cuda:1 while cuda:0 is
    current). CPU tensors (Triton's interpreter) need nothing."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _check(student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.stride(1) != 1 or teacher.stride(1) != 1:
        raise ValueError("student and teacher logits need a contiguous last dimension")


def kd_loss_fwd(student, teacher, labels, weights, *args):
    """Launcher of the forward: (loss [N] fp32, stats [N, 4] fp32). See docs/design.md §2."""
    args = KernelArgs(*args)
    _check(student, teacher)
    n = student.shape[0]
    loss = torch.empty(n, dtype=torch.float32, device=student.device)
    stats = torch.empty((n, 4), dtype=torch.float32, device=student.device)
    if n:
        with on_device(student.device):
            _kd_fwd_kernel[(n,)](
                *fwd_args(student, teacher, labels, weights, loss, stats),
                **launch_meta(student, teacher, labels, weights, args),
            )
    return loss, stats


def kd_loss_bwd(student, teacher, labels, weights, stats, grad_loss, *args_and_grad):
    """Launcher of the backward: writes the gradient into the last argument."""
    *args, grad = args_and_grad
    args = KernelArgs(*args)
    _check(student, teacher)
    n = student.shape[0]
    if n:
        with on_device(student.device):
            _kd_bwd_kernel[(n,)](
                *bwd_args(student, teacher, labels, weights, stats, grad_loss, grad),
                **launch_meta(student, teacher, labels, weights, args, grad),
            )
