"""Triton kernels of the fused KD loss on logits, and their launchers.

One program per row. The forward streams the row in BLOCK-wide tiles with an online softmax
(running max and sum of z_s/T, z_t/T and z_s, and the KL sums rescaled as the max moves); the
divergences that are not plain KL take a second pass once the log-sum-exps are known. The
backward streams the row once more and writes the gradient. Nothing of size [N, V] is
allocated but the gradient. Math and contract: fastkd/_ops.py; truth: fastkd/reference.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Divergence codes (fastkd._options.DIVERGENCES order).
KL: tl.constexpr = tl.constexpr(0)
REVERSE_KL: tl.constexpr = tl.constexpr(1)
JSD: tl.constexpr = tl.constexpr(2)
TVD: tl.constexpr = tl.constexpr(3)
SKEW_KL: tl.constexpr = tl.constexpr(4)
SKEW_REVERSE_KL: tl.constexpr = tl.constexpr(5)

NEG_INF: tl.constexpr = tl.constexpr(float("-inf"))


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
def _online(m, s, x):
    """Merge tile x into a running (max, sum of exp(x - max)); returns the rescale factor of
    the old sums and the (finite) reference point used for this tile."""
    m_new = tl.maximum(m, tl.max(x, 0))
    ref = tl.where(m_new == NEG_INF, 0.0, m_new)
    rescale = tl.exp(m - ref)
    s = s * rescale + tl.sum(tl.exp(x - ref), 0)
    return m_new, s, rescale, ref


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
def _load_tile(
    s_row,
    t_row,
    cols,
    VS,
    VT,
    KV,
    inv_t,
    s_scale,
    s_cap,
    t_scale,
    t_cap,
    S_CAP: tl.constexpr,
    T_CAP: tl.constexpr,
    HAS_KD: tl.constexpr,
):
    """Transformed student logits x_s, and a = x_s / T, b = x_t / T on the KD columns
    (-inf elsewhere: outside KV, or past the teacher's vocabulary; everywhere without a KD
    term, whose teacher is then not read)."""
    zs = tl.load(s_row + cols, mask=cols < VS, other=NEG_INF).to(tl.float32)
    xs = _transform(zs, s_scale, s_cap, S_CAP)
    kd = cols < KV
    if HAS_KD:
        zt = tl.load(t_row + cols, mask=kd & (cols < VT), other=NEG_INF).to(tl.float32)
        xt = _transform(zt, t_scale, t_cap, T_CAP)
        b = tl.where(kd, xt * inv_t, NEG_INF)
    else:
        kd = cols < 0
        b = tl.full((1,), NEG_INF, tl.float32)
    a = tl.where(kd, xs * inv_t, NEG_INF)
    return xs, a, b


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
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    w, y = _row_weight(L, W, row, ignore_index, HAS_LABELS, HAS_WEIGHTS)
    s_row = S + row * stride_s
    t_row = T + row * stride_t
    offs = tl.arange(0, BLOCK)

    m_a = tl.full((), NEG_INF, tl.float32)
    s_a = tl.zeros((), tl.float32)
    m_b = tl.full((), NEG_INF, tl.float32)
    s_b = tl.zeros((), tl.float32)
    m_c = tl.full((), NEG_INF, tl.float32)
    s_c = tl.zeros((), tl.float32)
    acc = tl.zeros((), tl.float32)  # sum e^(b-m_b)(b-a) for kl, e^(a-m_a)(a-b) for reverse_kl
    loss = tl.zeros((), tl.float32)
    lse_a = tl.zeros((), tl.float32)
    lse_b = tl.zeros((), tl.float32)
    lse_c = tl.zeros((), tl.float32)
    g = tl.zeros((), tl.float32)
    if w != 0.0:
        for start in range(0, VS, BLOCK):
            cols = start + offs
            xs, a, b = _load_tile(
                s_row,
                t_row,
                cols,
                VS,
                VT,
                KV,
                inv_t,
                s_scale,
                s_cap,
                t_scale,
                t_cap,
                S_CAP,
                T_CAP,
                HAS_KD,
            )
            if HAS_KD:
                m_a, s_a, r_a, ref_a = _online(m_a, s_a, a)
                m_b, s_b, r_b, ref_b = _online(m_b, s_b, b)
                if DIV == KL:
                    term = tl.where(b > NEG_INF, tl.exp(b - ref_b) * (b - a), 0.0)
                    acc = acc * r_b + tl.sum(term, 0)
                if DIV == REVERSE_KL:
                    term = tl.where(a > NEG_INF, tl.exp(a - ref_a) * (a - b), 0.0)
                    acc = acc * r_a + tl.sum(term, 0)
            if HAS_CE:
                m_c, s_c, _, _ = _online(m_c, s_c, xs)
        d = tl.zeros((), tl.float32)
        if not HAS_KD:
            pass
        elif DIV == KL:
            lse_a = m_a + tl.log(s_a)
            lse_b = m_b + tl.log(s_b)
            d = acc / s_b - lse_b + lse_a
        elif DIV == REVERSE_KL:
            lse_a = m_a + tl.log(s_a)
            lse_b = m_b + tl.log(s_b)
            d = acc / s_a - lse_a + lse_b
            g = d
        else:
            lse_a = m_a + tl.log(s_a)
            lse_b = m_b + tl.log(s_b)
            log_w1 = tl.log(mix)
            log_w2 = tl.log(1.0 - mix)
            for start in range(0, VS, BLOCK):
                cols = start + offs
                xs, a, b = _load_tile(
                    s_row,
                    t_row,
                    cols,
                    VS,
                    VT,
                    KV,
                    inv_t,
                    s_scale,
                    s_cap,
                    t_scale,
                    t_cap,
                    S_CAP,
                    T_CAP,
                    HAS_KD,
                )
                lq = a - lse_a
                lp = b - lse_b
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
                    qg = -(1.0 - mix) * tl.exp(lq + lp - lm)
                    g += tl.sum(tl.where((q > 0.0) & (p > 0.0), qg, 0.0), 0)
                else:  # SKEW_REVERSE_KL
                    lm = _log_mix(lq, lp, log_w1, log_w2)
                    tq = tl.where(q > 0.0, q * (lq - lm), 0.0)
                    d += tl.sum(tq, 0)
                    qg = tq - mix * tl.exp(2.0 * lq - lm)
                    g += tl.sum(tl.where(q > 0.0, qg, 0.0), 0)
        loss = kd_w * temp * temp * d
        if HAS_CE:
            lse_c = m_c + tl.log(s_c)
            valid = (y >= 0) & (y < VS)
            zy = tl.load(s_row + y, mask=valid, other=0.0).to(tl.float32)
            xy = _transform(zy, s_scale, s_cap, S_CAP)
            loss += ce_w * tl.where(valid, lse_c - xy, float("nan"))
        loss = w * loss
    tl.store(LOSS + row, loss)
    tl.store(STATS + row * 4 + 0, lse_a)
    tl.store(STATS + row * 4 + 1, lse_b)
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
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    w, y = _row_weight(L, W, row, ignore_index, HAS_LABELS, HAS_WEIGHTS)
    s_row = S + row * stride_s
    t_row = T + row * stride_t
    g_row = G + row * stride_g
    offs = tl.arange(0, BLOCK)
    if w != 0.0:
        scale = w * tl.load(GL + row)
        lse_a = tl.load(STATS + row * 4 + 0)
        lse_b = tl.load(STATS + row * 4 + 1)
        lse_c = tl.load(STATS + row * 4 + 2)
        big_g = tl.load(STATS + row * 4 + 3)
        if DIV != KL and DIV != REVERSE_KL and DIV != TVD:
            log_w1 = tl.log(mix)
            log_w2 = tl.log(1.0 - mix)
        kd_scale = scale * kd_w * temp
        for start in range(0, VS, BLOCK):
            cols = start + offs
            xs, a, b = _load_tile(
                s_row,
                t_row,
                cols,
                VS,
                VT,
                KV,
                inv_t,
                s_scale,
                s_cap,
                t_scale,
                t_cap,
                S_CAP,
                T_CAP,
                HAS_KD,
            )
            lq = a - lse_a
            lp = b - lse_b
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
                qg = tl.where((q > 0.0) & (p > 0.0), -(1.0 - mix) * tl.exp(lq + lp - lm), 0.0)
                dd = qg - q * big_g
            else:  # SKEW_REVERSE_KL
                lm = _log_mix(lq, lp, log_w1, log_w2)
                qg = q * (lq - lm) - mix * tl.exp(2.0 * lq - lm)
                dd = tl.where(q > 0.0, qg - q * big_g, 0.0)
            grad = kd_scale * tl.where(cols < KV, dd, 0.0)
            if HAS_CE:
                s1 = tl.exp(xs - lse_c)
                grad += (scale * ce_w) * (s1 - tl.where(cols == y, 1.0, 0.0))
            grad = grad * _dtransform(xs, s_scale, s_cap, S_CAP)
            tl.store(g_row + cols, grad.to(G.dtype.element_ty), mask=cols < VS)
    else:
        zero = tl.zeros((BLOCK,), tl.float32)
        for start in range(0, VS, BLOCK):
            cols = start + offs
            tl.store(g_row + cols, zero.to(G.dtype.element_ty), mask=cols < VS)


def _launch_meta(student: torch.Tensor, teacher: torch.Tensor, labels, weights, args) -> dict:
    (div, temp, kd_w, ce_w, mix, ignore_index, kd_vocab, s_scale, s_cap, t_scale, t_cap) = args
    vs = student.shape[1]
    block = min(triton.next_power_of_2(vs), 4096)
    scalars = dict(
        VS=vs,
        VT=teacher.shape[1],
        KV=kd_vocab,
        inv_t=1.0 / temp,
        temp=temp,
        kd_w=kd_w,
        ce_w=ce_w,
        mix=mix,
        ignore_index=ignore_index,
        s_scale=s_scale,
        s_cap=s_cap,
        t_scale=t_scale,
        t_cap=t_cap,
        DIV=div,
        HAS_LABELS=labels is not None,
        HAS_WEIGHTS=weights is not None,
        HAS_KD=kd_w != 0.0,
        HAS_CE=ce_w != 0.0 and labels is not None,
        S_CAP=s_cap != 0.0,
        T_CAP=t_cap != 0.0,
        BLOCK=block,
        num_warps=8 if block >= 2048 else 4,
    )
    return scalars


def _check(student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.stride(1) != 1 or teacher.stride(1) != 1:
        raise ValueError("student and teacher logits need a contiguous last dimension")


def kd_loss_fwd(student, teacher, labels, weights, *args):
    """Launcher of the forward: (loss [N] fp32, stats [N, 4] fp32). See fastkd/_ops.py."""
    _check(student, teacher)
    n = student.shape[0]
    loss = torch.empty(n, dtype=torch.float32, device=student.device)
    stats = torch.empty((n, 4), dtype=torch.float32, device=student.device)
    if n:
        _kd_fwd_kernel[(n,)](
            student,
            teacher,
            loss if labels is None else labels,
            loss if weights is None else weights,
            loss,
            stats,
            student.stride(0),
            teacher.stride(0),
            **_launch_meta(student, teacher, labels, weights, args),
        )
    return loss, stats


def kd_loss_bwd(student, teacher, labels, weights, stats, grad_loss, *args_and_grad):
    """Launcher of the backward: writes the gradient into the last argument."""
    *args, grad = args_and_grad
    _check(student, teacher)
    n = student.shape[0]
    if n:
        _kd_bwd_kernel[(n,)](
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
            **_launch_meta(student, teacher, labels, weights, tuple(args)),
        )
    return None
