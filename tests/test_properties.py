"""Property tests (hypothesis): ``kd_loss`` and ``fused_linear_kd_loss`` on every backend against
the fp64 reference (docs/design.md §1), loss and gradient, over random row counts (0 included),
odd vocabularies (1 included, teacher vocabularies that differ), every divergence, temperatures
0.1-20, the CE/KD weights, beta, skew, every reduction, token weights (zeros included), ignored
labels (all of them included), -inf and very negative logits, and fp32/bf16/fp16 inputs.

The truth is ``backend="reference"`` on the inputs rounded to the tested dtype, then cast to
fp64: rounding the inputs is the caller's doing, not a kernel's error. The allowed error of
each value is the tolerance model of docs/design.md §7 (``row_units`` and the functions below
it say how it scales). Each example is a small dataclass of plain numbers, so hypothesis prints
a failing one as a repro: ``check_kd(KDCase(...), "cpu")``.

Example counts are fixed per test; under CI=true the ``ci`` settings profile of
tests/conftest.py makes the examples the same on every run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from conftest import device_for, gpu_row_error, kernel_backends
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

import fastkd
from fastkd._options import DIVERGENCES, REDUCTIONS, LossOptions
from fastkd.reference import kd_loss_rows

EPS = 2.0**-23  # the kernels compute in fp32 whatever the input dtype (docs/design.md §1)
# An entry with less probability than this cannot move an fp32 sum: its logit's rounding is
# not part of a row's error, however large the logit.
MASS = 1e-30
# A finite logit whose probability is exactly 0 in fp32 and in fp64 at every T <= 20
# (-6e4 / 20 = -3000 < -745), and representable in fp16.
VERY_NEGATIVE = -6.0e4
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Each fp32 operation may land on a multiple of this near 0: an element takes a handful of
# them (8 allowed), a reduction one per row.
SUBNORMAL = 2.0**-149
TIE = 2.0**-120  # a probability below this may be 0 or not in fp32 (row_units)

_PARAMS = {p.id: p for p in kernel_backends()}
REFERENCE_AND_CPU = [pytest.param("reference", id="reference"), _PARAMS["cpu"]]
SLOW_BACKENDS = [_PARAMS["triton"], _PARAMS["cuda"]]  # the interpreter: ~0.3 s a call


# --- the examples -----------------------------------------------------------------------------


@dataclass(frozen=True)
class KDCase:
    """One kd_loss call: shapes, how the logits are drawn (from ``seed``), which rows count,
    the options and the input dtype."""

    n: int
    v: int
    vt: int
    dtype: torch.dtype
    options: dict
    seed: int = 0
    spread: tuple[float, float] = (3.0, 3.0)  # std of the student's and the teacher's logits
    offset: float = 0.0
    teacher: str = "independent"  # or "near" (student + 1e-3 noise) or "equal"
    masks: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # P(-inf), P(VERY_NEGATIVE)
    # for the student, then the teacher; column 0 is always finite
    ignored: tuple[bool, ...] | None = None  # per row; None: no labels
    label_dtype: torch.dtype = torch.int64
    token_weights: tuple[float, ...] | None = None
    poison: bool = False  # NaN in the rows that do not count: they must not be read
    three_d: bool = False  # [2, n / 2, V]
    grad_scale: float = 1.0  # grad_output of a scalar loss; per-token ones are drawn from seed

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return (2, self.n // 2) if self.three_d else (self.n,)


def _vocab(draw, v: int) -> tuple[int, dict]:
    """A teacher vocabulary (often the student's) and the vocab option it needs."""
    vt = draw(st.one_of(st.just(v), st.integers(1, 67)))
    if vt == v:
        return vt, {}
    return vt, {"vocab": "truncate" if vt > v else draw(st.sampled_from(["truncate", "pad"]))}


@st.composite
def loss_options(draw, v: int, vt_mode: dict) -> dict:
    """Every loss option but the logit scales and softcaps (tests/test_options.py has those)."""
    options = {
        **vt_mode,
        "divergence": draw(st.sampled_from(DIVERGENCES)),
        "temperature": draw(st.floats(0.1, 20.0)),
        "beta": draw(st.floats(0.0, 1.0, width=32)),
        "skew": draw(st.floats(0.0, 1.0, exclude_max=True, width=32)),
        "reduction": draw(st.sampled_from(REDUCTIONS)),
        "ignore_index": draw(st.sampled_from([-100, -1, 0])),
    }
    weights = draw(st.sampled_from(["alpha", "kd_weight", "ce_weight", "both"]))
    if weights == "alpha":
        options["alpha"] = draw(st.floats(0.0, 1.0, width=32))
    elif weights == "both":
        options["kd_weight"] = draw(st.floats(0.0, 4.0, width=32))
        options["ce_weight"] = draw(st.floats(0.0, 4.0, width=32))
    else:  # alone, the other is 0: a lone 0 would make the loss 0, which is an error
        options[weights] = draw(st.floats(0.0, 4.0, exclude_min=True, width=32))
    return options


def _ce_weight(options: dict) -> float:
    return LossOptions(**options).kernel_args(1, 1).ce_weight


@st.composite
def per_row(draw, n: int, case_options: dict, dtype: torch.dtype) -> dict:
    """Labels (which rows are ignored), token weights and the other per-row fields."""
    ignored = tuple(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    if _ce_weight(case_options) == 0 and draw(st.booleans()):
        ignored = None  # no labels at all
    weights = None
    if draw(st.booleans()):
        weight = st.floats(2.0**-10, 4.0, width=32) | st.just(0.0)
        weights = tuple(draw(st.lists(weight, min_size=n, max_size=n)))
    return {
        "ignored": ignored,
        "label_dtype": draw(st.sampled_from([torch.int64, torch.int32])),
        "token_weights": weights,
        "three_d": n > 0 and n % 2 == 0 and draw(st.booleans()),
        "grad_scale": draw(st.sampled_from([1.0, -2.5, 0.125])),
        "dtype": dtype,
    }


@st.composite
def kd_cases(draw, max_rows: int = 8) -> KDCase:
    n = draw(st.integers(0, max_rows))
    v = 2 * draw(st.integers(0, 33)) + 1
    vt, vt_mode = _vocab(draw, v)
    options = draw(loss_options(v, vt_mode))
    prob = st.sampled_from([0.0, 0.0, 0.2, 0.6])
    return KDCase(
        n=n,
        v=v,
        vt=vt,
        options=options,
        seed=draw(st.integers(0, 2**31 - 1)),
        spread=(draw(st.floats(0.0, 30.0)), draw(st.floats(0.0, 30.0))),
        offset=draw(st.floats(-100.0, 100.0)),
        teacher=draw(st.sampled_from(["independent", "near", "equal"])),
        masks=(draw(prob), draw(prob), draw(prob), draw(prob)),
        poison=draw(st.booleans()),
        **draw(per_row(n, options, draw(st.sampled_from(DTYPES)))),
    )


def _finite_or_masked(x: torch.Tensor, p_inf: float, p_neg: float, g: torch.Generator):
    u = torch.rand(x.shape, generator=g)
    u[:, 0] = 1.0  # one finite logit per row: a row of -inf has no distribution
    x = torch.where(u < p_inf, -math.inf, x)
    return torch.where((u >= p_inf) & (u < p_inf + p_neg), VERY_NEGATIVE, x)


def _per_token(case, g: torch.Generator, student: torch.Tensor):
    """(labels, token weights, rows that count) of a case, flat [n]. No label points at a
    student -inf (its CE would be infinite): such a label moves to column 0, which is finite."""
    n, v = student.shape
    weights = None
    if case.token_weights is not None:
        weights = torch.tensor(case.token_weights, dtype=torch.float32)
    live = torch.ones(n, dtype=torch.bool) if weights is None else weights != 0
    labels = None
    if case.ignored is not None:
        labels = torch.randint(0, v, (n,), generator=g)
        masked = student.gather(1, labels[:, None]).squeeze(1) == -math.inf
        labels = torch.where(masked, 0, labels)
        ignore_index = case.options["ignore_index"]
        labels = torch.where(torch.tensor(case.ignored, dtype=torch.bool), ignore_index, labels)
        live &= labels != ignore_index
    return labels, weights, live


def _shaped(case, *tensors):
    """The per-token tensors (or None) in the case's batch shape."""
    return [None if t is None else t.reshape(case.batch_shape + t.shape[1:]) for t in tensors]


def build_kd(case: KDCase):
    """(student, teacher, labels, token_weights, grad_output) of a case: the logits in the
    case's dtype, the per-token tensors in its batch shape."""
    g = torch.Generator().manual_seed(case.seed)
    n, v, vt = case.n, case.v, case.vt
    student = case.offset + case.spread[0] * torch.randn(n, v, generator=g)
    teacher = case.offset + case.spread[1] * torch.randn(n, vt, generator=g)
    shared = min(v, vt)
    if case.teacher == "equal":
        teacher[:, :shared] = student[:, :shared]
    elif case.teacher == "near":
        teacher[:, :shared] = student[:, :shared] + 1e-3 * torch.randn(n, shared, generator=g)
    student = _finite_or_masked(student, case.masks[0], case.masks[1], g)
    teacher = _finite_or_masked(teacher, case.masks[2], case.masks[3], g)
    labels, weights, live = _per_token(case, g, student)
    if case.poison:
        student[~live] = math.nan
        teacher[~live] = math.nan
    if labels is not None:
        labels = labels.to(case.label_dtype)
    grad_out = torch.randn(n, generator=g) if case.options["reduction"] == "none" else None
    student, teacher, labels, weights, grad_out = _shaped(
        case, student.to(case.dtype), teacher.to(case.dtype), labels, weights, grad_out
    )
    return (
        student,
        teacher,
        labels,
        weights,
        torch.tensor(case.grad_scale) if grad_out is None else grad_out,
    )


# --- the truth and the tolerance model (docs/design.md §7) ------------------------------------


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def _floor(dtype: torch.dtype) -> float:
    """What rounding to ``dtype`` may lose near 0. fp32 and bf16: their smallest normal
    (1.2e-38), as flushing a subnormal to 0 (or Triton's interpreter turning an fp32 subnormal
    into bf16 2^-127) loses nothing that matters; fp16: its subnormal spacing (6e-8), whose
    normal range ends at 6.1e-5, where gradients still matter."""
    info = torch.finfo(dtype)
    return info.smallest_normal * (info.eps if dtype == torch.float16 else 1.0)


@dataclass
class Rows:
    """What the tolerance model needs of each row, from the fp64 inputs: its weight w (0 where
    it does not count), the error units of its KD and CE terms, and the tvd ties."""

    w: torch.Tensor
    loss_unit: torch.Tensor  # error of loss_i / w_i
    grad_unit: torch.Tensor  # error of each element of d loss_i / d z_s / w_i, [n, 1]
    tie: torch.Tensor  # [n, V]: extra error of tvd's gradient at p_j ~ q_j
    spread: torch.Tensor  # M_ab: the largest |a_j|, |b_j| that carries probability
    kd: float
    ce: float


def _spread(x: torch.Tensor, prob: torch.Tensor) -> torch.Tensor:
    return torch.where((prob > MASS) & x.isfinite(), x.abs(), 0.0).amax(-1)


def row_units(xs, xt, labels, weights, options, gpu_math: bool = False) -> Rows:
    """The per-row error model, from fp64 logits [n, V] and [n, Vt].

    Every kernel computes in fp32 (unit roundoff EPS). With a = x_s/T, b = x_t/T over the KD
    columns and M_ab the largest |a_j| (|b_j|) whose probability q_j (p_j) exceeds MASS, each
    log-probability, and so each probability relatively, is off by at most about
    u_ab = EPS (M_ab + 1)(4 + log2 V): the rounding of a_j and of the log-sum-exp (|a_j| EPS
    each), plus a sum of V positive terms (log2 V EPS, pairwise or in double). Logits that carry
    no probability (very negative or -inf) do not enter M.

    D and its gradient sum probabilities times log-ratios (lp - lq, lq - lm, ...): the error of
    a probability becomes u_ab R there, R the largest |lp_j - lq_j| where either model has mass,
    plus 1 + |log(1 - mix)| for the mixtures' log m (tvd has no log-ratio: R = 1). So D is
    within u_ab (4 + 2 R), which the KD term scales by kd_weight T^2 (its gradient, dD/da times
    T, by kd_weight T); a log-ratio that reads a logit carrying no probability (reverse KL
    against a teacher with none where the student has some) is within R too. The CE is a
    log-sum-exp over all Vs columns minus a logit: within 4 u_c, with M_c the largest |x_s|
    carrying probability or labelled. With ``gpu_math`` (Triton on a GPU), u_ab and u_c grow by
    tests/conftest.py's gpu_row_error, the bound of docs/design.md §7 on what approximate exp
    and division add to a log-sum-exp.
    """
    args = LossOptions(**options).kernel_args(xs.shape[1], xt.shape[1])
    n, v = xs.shape
    w = torch.ones(n, dtype=torch.float64) if weights is None else weights.double()
    if labels is not None:
        w = torch.where(labels == args.ignore_index, 0.0, w)
    live = w != 0
    xs = torch.where(live[:, None], xs, 0.0)  # rows that do not count may hold NaN
    xt = torch.where(live[:, None], xt, 0.0)
    kv, t = args.kd_vocab, args.temperature
    a = xs[:, :kv] / t
    b = torch.nn.functional.pad(xt[:, :kv], (0, kv - min(kv, xt.shape[1])), value=-math.inf) / t
    lq, lp = a.log_softmax(-1), b.log_softmax(-1)
    q, p = lq.exp(), lp.exp()
    kind = DIVERGENCES[args.divergence]
    # A probability below fp32's normal range against a -inf partner: 0 * inf in fp32, a finite
    # term; p * inf in fp64, an infinite one. Which is right depends on a rounding: skip.
    tiny = (p > 0) & (p < TIE) & (a == -math.inf) if kind == "kl" else None
    if kind == "reverse_kl":
        tiny = (q > 0) & (q < TIE) & (b == -math.inf)
    if tiny is not None and tiny.any():
        reject()
    m_ab = torch.maximum(_spread(a, q), _spread(b, p))
    # The largest log-ratio that a probability with its error multiplies.
    ratio = torch.where((p + q > MASS) & a.isfinite() & b.isfinite(), (lp - lq).abs(), 0.0)
    ratio = ratio.amax(-1) + 1 + abs(math.log1p(-args.mix))
    if kind == "tvd":
        ratio = torch.ones_like(ratio)
    m_c = _spread(xs, xs.softmax(-1))
    ce = args.ce_weight if labels is not None else 0.0
    if labels is not None:
        target = torch.where(live, labels, 0).long()
        m_c = torch.maximum(m_c, xs.gather(1, target[:, None]).squeeze(1).abs())
    u_ab = EPS * (m_ab + 1) * (4 + math.log2(kv))
    u_c = EPS * (m_c + 1) * (4 + math.log2(v))
    if gpu_math:  # approximate exp and division: each log-sum-exp off by e_V more (§7)
        u_ab = u_ab + gpu_row_error(kv, t)
        u_c = u_c + gpu_row_error(v)
    kd = args.kd_weight
    tie = torch.zeros_like(xs)
    if kind == "tvd" and kd:
        # d tvd / d a_j = q_j (h_j - sum_k q_k h_k), h = sign(q - p) / 2: where q_j and p_j are
        # within their rounding, h_j may flip, which moves column j by q_j and every column k by
        # q_k q_j.
        near = (q - p).abs() <= 4 * u_ab[:, None] * (q + p) + TIE
        tie_mass = (q * near).sum(-1, keepdim=True)
        tie[:, :kv] = kd * t * q * (tie_mass + near)
    return Rows(
        w=w,
        loss_unit=kd * t * t * u_ab * (4 + 2 * ratio) + ce * 4 * u_c,
        grad_unit=(kd * t * u_ab * (4 + 2 * ratio) + ce * 4 * u_c)[:, None],
        tie=tie,
        spread=m_ab,
        kd=kd,
        ce=ce,
    )


def _rel(v: int) -> float:
    """Relative error of a row's sums over V columns, for terms as large as their error."""
    return 8 * EPS * (4 + math.log2(max(v, 1)))


def reduction_scale(reduction: str, w: torch.Tensor) -> float:
    """d reduced loss / d loss_i of the scalar reductions (1 for ``none``)."""
    if reduction == "mean":
        total = float(w.sum())
        return 1.0 / total if total else 1.0
    if reduction == "batchmean":
        return 1.0 / max(w.shape[0], 1)
    return 1.0


def loss_tolerance(reduction: str, rows: torch.Tensor, row_tol: torch.Tensor, w: torch.Tensor):
    """Allowed error of the reduced loss from the rows' losses (fp64) and tolerances: a
    reduction adds one fp32 rounding per row."""
    if reduction == "none":
        return row_tol
    finite = rows.isfinite()
    tol = torch.where(finite, row_tol + EPS * (rows.numel() + 2) * rows.abs(), 0.0).sum()
    return tol * reduction_scale(reduction, w)


def assert_within(actual, truth, allowed, name: str) -> None:
    """|actual - truth| <= allowed elementwise; an infinite truth must be matched exactly, and
    NaN is never right. The truth must not be NaN: that would be a bug of the reference."""
    actual = actual.detach().double().cpu()
    assert actual.shape == truth.shape, f"{name}: shape {actual.shape} != {truth.shape}"
    assert not truth.isnan().any(), f"{name}: the fp64 reference gives NaN"
    err = (actual - truth).abs()
    bad = torch.where(truth.isinf(), actual != truth, ~(err <= allowed))
    if bad.any():
        excess = torch.where(bad, (err - allowed).nan_to_num(nan=math.inf), 0.0)
        i = int(excess.reshape(-1).argmax())
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements out of tolerance; worst (flat "
            f"{i}): actual {actual.reshape(-1)[i].item():.9g}, truth "
            f"{truth.reshape(-1)[i].item():.9g}, allowed error {allowed.reshape(-1)[i].item():.3g}"
        )


@dataclass
class Expected:
    """The fp64 truth of a kd_loss call and the error its fp32 math may add (before the result
    is rounded to its dtype)."""

    loss: torch.Tensor  # reduced as asked: [] or [n]
    loss_allowed: torch.Tensor
    grad: torch.Tensor  # [n, V]: d loss / d student logits
    grad_allowed: torch.Tensor
    counted: torch.Tensor  # [n]: rows whose loss is finite (elsewhere no gradient is defined)
    rows: Rows


def expect(
    xs, xt, labels, weights, options, grad_out, logit_error=None, gpu_math=False
) -> Expected:
    """Truth and tolerance of kd_loss on fp64 logits xs [n, V], xt [n, Vt] (flat labels and
    weights; ``grad_out`` of the reduced loss). ``logit_error`` = (dz_s, dz_t) [n]: how far
    the logits themselves may be off (the fused loss's GEMMs); each moves the loss by its
    gradient's L1 norm times dz, and the gradient by its second derivative, at most
    2 (kd_weight (1 + 4 M_ab) + ce_weight) dz per element (softmax Jacobians are <= 2 in L1,
    and the log-ratios they multiply are <= 4 M_ab). ``gpu_math``: see ``row_units``."""
    n, v = xs.shape
    z = xs.clone().requires_grad_(True)
    loss = fastkd.kd_loss(z, xt, labels, token_weights=weights, backend="reference", **options)
    loss.backward(grad_out.double().reshape(loss.shape))
    rows = row_units(xs, xt, labels, weights, options, gpu_math)
    args = LossOptions(**options).kernel_args(v, xt.shape[1])
    reduction = options["reduction"]
    row_tol = rows.w * rows.loss_unit
    grad_unit = rows.grad_unit
    if logit_error is not None:
        dz_s, dz_t = logit_error
        zs, zt = xs.clone().requires_grad_(True), xt.clone().requires_grad_(True)
        row_sum = kd_loss_rows(zs, zt, labels, weights, args).sum()
        g_s, g_t = torch.zeros_like(zs), torch.zeros_like(zt)
        if row_sum.requires_grad:  # else no row counts
            g_s, g_t = torch.autograd.grad(
                row_sum, (zs, zt), allow_unused=True, materialize_grads=True
            )
        row_tol = row_tol + g_s.abs().sum(-1) * dz_s + g_t.abs().sum(-1) * dz_t
        hessian = rows.kd * (1 + 4 * rows.spread) * (dz_s + dz_t) + rows.ce * dz_s
        grad_unit = grad_unit + 2 * hessian[:, None]
    with torch.no_grad():
        row_loss = kd_loss_rows(xs, xt, labels, weights, args)
    # A term weight near fp32's subnormal range has few bits: kd_weight T^2 (times a token
    # weight) may round by a whole subnormal spacing, a relative error of SUBNORMAL over it.
    t = args.temperature
    factors = (rows.kd * t * t, rows.kd * t, rows.kd, rows.ce)
    smallest = torch.where(rows.w > 0, rows.w.clamp(max=1.0), 1.0)
    rel = _rel(v) + max((SUBNORMAL / f for f in factors if f > 0), default=0.0) / smallest
    row_tol = row_tol + rel * row_loss.abs()
    scale = reduction_scale(reduction, rows.w) * grad_out.double().abs().reshape(-1).expand(n)
    grad = z.grad
    return Expected(
        loss=loss.detach(),
        loss_allowed=loss_tolerance(reduction, row_loss, row_tol, rows.w).reshape(loss.shape)
        + (n + 8) * SUBNORMAL,
        grad=grad,
        grad_allowed=(scale * rows.w)[:, None] * (grad_unit + rows.tie)
        + rel[:, None] * grad.abs()
        + 8 * SUBNORMAL,
        counted=row_loss.isfinite(),
        rows=rows,
    )


def _gpu_math(backend: str) -> bool:
    """Whether the backend runs Triton's approximate exp and division (on a GPU)."""
    return backend == "triton" and device_for(backend).type == "cuda"


def _rounded(allowed, truth, dtype: torch.dtype):
    """``allowed`` plus the rounding of a result to ``dtype``."""
    return allowed + _eps(dtype) * truth.abs() + _floor(dtype)


def _in(dtype: torch.dtype, truth: torch.Tensor) -> torch.Tensor:
    """The truth as a result in ``dtype`` can be right: +-inf where it overflows ``dtype``
    (an fp16 gradient beyond 65504)."""
    rounded = truth.to(dtype).double()
    return torch.where(rounded.isinf(), rounded, truth)


def check_kd(case: KDCase, backend: str, options: dict | None = None) -> None:
    """kd_loss on ``backend`` (with ``options``, by default the case's) against the fp64
    reference with the case's options: the loss, and the gradient of every row whose loss is
    finite. A student -inf logit gets no gradient (docs/design.md §1)."""
    student, teacher, labels, weights, grad_out = build_kd(case)
    dev = device_for(backend)
    s = student.to(dev, copy=True).requires_grad_(True)
    loss = fastkd.kd_loss(
        s,
        teacher.to(dev),
        None if labels is None else labels.to(dev),
        token_weights=None if weights is None else weights.to(dev),
        backend=backend,
        **(case.options if options is None else options),
    )
    grad_out = grad_out.to(loss.dtype)
    loss.backward(grad_out.to(dev))

    n, v = case.n, case.v
    xs = student.double().reshape(n, v)
    e = expect(
        xs,
        teacher.double().reshape(n, case.vt),
        None if labels is None else labels.reshape(n).long(),
        None if weights is None else weights.reshape(n),
        case.options,
        grad_out,
        gpu_math=_gpu_math(backend),
    )
    loss_allowed = _rounded(e.loss_allowed, e.loss, loss.dtype)
    assert_within(loss.reshape(e.loss.shape), e.loss, loss_allowed, "loss")
    grad_allowed = torch.where(xs == -math.inf, 0.0, _rounded(e.grad_allowed, e.grad, case.dtype))
    rows = e.counted
    grad_truth = _in(case.dtype, e.grad[rows])
    assert_within(s.grad.reshape(n, v)[rows.to(dev)], grad_truth, grad_allowed[rows], "grad")


@dataclass(frozen=True)
class FusedCase:
    """One fused_linear_kd_loss call: the student head [V, h] (+ bias), the teacher as logits,
    as hidden states and a head (+ bias), or none (CE only), drawn from ``seed``."""

    n: int
    h: int
    v: int
    vt: int
    dtype: torch.dtype
    options: dict
    seed: int = 0
    spread: tuple[float, float] = (1.0, 3.0)  # std of the student's hidden states, the teacher's
    # logits
    teacher: str = "logits"  # or "hidden", "hidden+bias", "none"
    ht: int = 4
    bias: bool = False
    chunk_size: int | None = None
    ignored: tuple[bool, ...] | None = None
    label_dtype: torch.dtype = torch.int64
    token_weights: tuple[float, ...] | None = None
    three_d: bool = False
    grad_scale: float = 1.0

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return (2, self.n // 2) if self.three_d else (self.n,)


@st.composite
def fused_cases(draw, max_rows: int = 8) -> FusedCase:
    n = draw(st.integers(0, max_rows))
    v = 2 * draw(st.integers(0, 33)) + 1
    vt, vt_mode = _vocab(draw, v)
    options = draw(loss_options(v, vt_mode))
    teachers = ["logits", "hidden", "hidden+bias"]
    if LossOptions(**options).kernel_args(v, vt).kd_weight == 0:
        teachers.append("none")
    return FusedCase(
        n=n,
        h=draw(st.integers(1, 16)),
        v=v,
        vt=vt,
        options=options,
        seed=draw(st.integers(0, 2**31 - 1)),
        spread=(draw(st.floats(0.0, 4.0)), draw(st.floats(0.0, 10.0))),
        teacher=draw(st.sampled_from(teachers)),
        ht=draw(st.integers(1, 16)),
        bias=draw(st.booleans()),
        chunk_size=draw(st.none() | st.integers(1, 8)),
        **draw(per_row(n, options, draw(st.sampled_from(DTYPES)))),
    )


def build_fused(case: FusedCase):
    """(student hidden, weight, bias, teacher keyword arguments, labels, token weights,
    grad_output) of a case, the tensors in its dtype and batch shape."""
    g = torch.Generator().manual_seed(case.seed)
    n, h, v, vt, ht = case.n, case.h, case.v, case.vt, case.ht
    hidden = case.spread[0] * torch.randn(n, h, generator=g)
    weight = 3.0 * torch.randn(v, h, generator=g) / math.sqrt(h)
    bias = torch.randn(v, generator=g) if case.bias else None
    teacher = {}
    if case.teacher == "logits":
        teacher["teacher_logits"] = case.spread[1] * torch.randn(n, vt, generator=g)
    elif case.teacher != "none":
        teacher["teacher_hidden"] = torch.randn(n, ht, generator=g)
        teacher["teacher_weight"] = (
            case.spread[1] * torch.randn(vt, ht, generator=g) / math.sqrt(ht)
        )
        if case.teacher == "hidden+bias":
            teacher["teacher_bias"] = torch.randn(vt, generator=g)
    labels, weights, _ = _per_token(case, g, torch.zeros(n, v))  # no -inf student logits
    if labels is not None:
        labels = labels.to(case.label_dtype)
    grad_out = torch.randn(n, generator=g) if case.options["reduction"] == "none" else None
    hidden, labels, weights, grad_out = _shaped(case, hidden, labels, weights, grad_out)
    for name in ("teacher_logits", "teacher_hidden"):
        if name in teacher:
            (teacher[name],) = _shaped(case, teacher[name])
    teacher = {k: t.to(case.dtype) for k, t in teacher.items()}
    return (
        hidden.to(case.dtype),
        weight.to(case.dtype),
        None if bias is None else bias.to(case.dtype),
        teacher,
        labels,
        weights,
        torch.tensor(case.grad_scale) if grad_out is None else grad_out,
    )


def _gemm_error(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """Per row, how far fp32 logits x @ w.T (+ b) may be from the fp64 ones: (K + 2) EPS times
    the largest sum of the products' magnitudes (K the inner dimension), and K + 1 subnormal
    spacings."""
    mags = x.abs() @ w.abs().T + (0.0 if b is None else b.abs())
    return EPS * (x.shape[1] + 2) * mags.amax(-1) + (x.shape[1] + 1) * SUBNORMAL


def check_fused(case: FusedCase, backend: str) -> None:
    """fused_linear_kd_loss on ``backend`` against the fp64 reference of the same logits: the
    loss and the gradients of the student's hidden states, weight and bias. Their tolerance is
    that of the logits' gradient (``expect``, with the GEMMs' error on the logits) carried
    through the backward GEMMs, plus those GEMMs' own rounding."""
    hidden, weight, bias, teacher, labels, weights, grad_out = build_fused(case)
    dev = device_for(backend)
    leaves = [t.to(dev, copy=True).requires_grad_(True) for t in (hidden, weight)]
    if bias is not None:
        leaves.append(bias.to(dev, copy=True).requires_grad_(True))
    loss = fastkd.fused_linear_kd_loss(
        leaves[0],
        leaves[1],
        None if labels is None else labels.to(dev),
        student_bias=leaves[2] if bias is not None else None,
        token_weights=None if weights is None else weights.to(dev),
        chunk_size=case.chunk_size,
        backend=backend,
        **{k: t.to(dev) for k, t in teacher.items()},
        **case.options,
    )
    grad_out = grad_out.to(loss.dtype)
    loss.backward(grad_out.to(dev))

    n = case.n
    h64, w64 = hidden.double().reshape(n, case.h), weight.double()
    b64 = None if bias is None else bias.double()
    zs = h64 @ w64.T + (0.0 if b64 is None else b64)
    dz_s, dz_t = _gemm_error(h64, w64, b64), torch.zeros(n, dtype=torch.float64)
    if "teacher_logits" in teacher:
        zt = teacher["teacher_logits"].double().reshape(n, case.vt)
    elif "teacher_hidden" in teacher:
        ht = teacher["teacher_hidden"].double().reshape(n, case.ht)
        bt = teacher.get("teacher_bias")
        bt = None if bt is None else bt.double()
        zt = ht @ teacher["teacher_weight"].double().T + (0.0 if bt is None else bt)
        dz_t = _gemm_error(ht, teacher["teacher_weight"].double(), bt)
    else:
        zt = torch.zeros(n, case.v, dtype=torch.float64)  # not read: the KD weight is 0
    e = expect(
        zs,
        zt,
        None if labels is None else labels.reshape(n).long(),
        None if weights is None else weights.reshape(n),
        case.options,
        grad_out,
        logit_error=(dz_s, dz_t),
        gpu_math=_gpu_math(backend),
    )
    assert_within(
        loss.reshape(e.loss.shape), e.loss, _rounded(e.loss_allowed, e.loss, loss.dtype), "loss"
    )
    g, g_tol = e.grad, e.grad_allowed

    def gemm(a, b, k):  # allowed error of fp32 a @ b (inner dimension k) beyond a's own
        return EPS * (k + 2) * (a.abs() @ b.abs()) + (k + 1) * SUBNORMAL

    truths = {
        "grad hidden": (g @ w64, g_tol @ w64.abs() + gemm(g, w64, case.v)),
        "grad weight": (g.T @ h64, g_tol.T @ h64.abs() + gemm(g.T, h64, n)),
        "grad bias": (
            g.sum(0),
            g_tol.sum(0) + EPS * (n + 2) * g.abs().sum(0) + (n + 1) * SUBNORMAL,
        ),
    }
    # For the scalar reductions the forward finishes the gradients in their dtype and the
    # backward multiplies them by grad_output there: two roundings.
    twice = 1.0 if case.options["reduction"] == "none" else 1.0 + abs(float(grad_out))
    for leaf, (name, (truth, allowed)) in zip(leaves, truths.items()):
        actual = leaf.grad.reshape(truth.shape)
        allowed = allowed + twice * _rounded(0.0, truth, case.dtype)
        assert_within(actual, _in(case.dtype, truth), allowed, name)


# --- the properties ---------------------------------------------------------------------------


def examples(n: int) -> settings:
    """``n`` examples with no deadline: a first call compiles or loads kernels."""
    return settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _options(**changes) -> dict:
    base = {"divergence": "kl", "temperature": 1.0, "reduction": "mean", "ignore_index": -100}
    return base | changes


def _minimal(**fields) -> KDCase:
    return KDCase(dtype=torch.float32, spread=(0.0, 0.0), **fields)


# Failures hypothesis found, in their minimal form, each a test of its own on every backend.
FOUND = {
    # the reference's backward had no graph to differentiate
    "both_weights_0": _minimal(
        n=1, v=1, vt=1, options=_options(kd_weight=0.0, ce_weight=0.0), ignored=(False,)
    ),
    # kd_weight T^2 below fp32's range times an infinite KL: 0 * inf gave NaN for +inf
    "tiny_kd_weight_infinite_kl": _minimal(
        n=1,
        v=3,
        vt=3,
        options=_options(kd_weight=2.0**-149, temperature=0.5),
        masks=(0.2, 0, 0, 0),
        ignored=(False,),
    ),
    # kl with a student -inf against a teacher whose probability underflows (0 log 0 = 0),
    # without and with another column where the KL is infinite: NaN
    "kl_underflow_against_inf": _minimal(
        n=2, v=3, vt=3, options=_options(alpha=0.5), masks=(0.2, 0, 0, 0.2), ignored=(False,) * 2
    ),
    "kl_underflow_against_inf_and_infinite": _minimal(
        n=1, v=13, vt=13, options=_options(alpha=0.5), masks=(0.2, 0, 0, 0.2), ignored=(False,)
    ),
    # a skew that fp32 barely holds and a teacher -inf: NaN gradient (cpu)
    "skew_reverse_kl_tiny_skew": _minimal(
        n=1,
        v=5,
        vt=5,
        options=_options(divergence="skew_reverse_kl", skew=2.0**-149, alpha=0.5),
        masks=(0, 0, 0.2, 0),
        ignored=(False,),
    ),
    # no rows and V = 1: logits whose last stride is 0 (triton refused them)
    "no_rows_vocab_1": _minimal(n=0, v=1, vt=1, options=_options(alpha=1.0), ignored=()),
}


@pytest.mark.parametrize("backend", [*REFERENCE_AND_CPU, *SLOW_BACKENDS])
@pytest.mark.parametrize("name", FOUND)
def test_found_by_hypothesis(name, backend):
    check_kd(FOUND[name], backend)


@pytest.mark.parametrize("backend", REFERENCE_AND_CPU)
@examples(500)
@given(case=kd_cases())
def test_kd_loss_matches_fp64(backend, case):
    check_kd(case, backend)


@pytest.mark.parametrize("backend", SLOW_BACKENDS)
@examples(100)
@given(case=kd_cases())
def test_kd_loss_kernels_match_fp64(backend, case):
    check_kd(case, backend)


@pytest.mark.parametrize("backend", REFERENCE_AND_CPU)
@examples(500)
@given(case=fused_cases())
def test_fused_linear_kd_loss_matches_fp64(backend, case):
    check_fused(case, backend)


@pytest.mark.parametrize("backend", SLOW_BACKENDS)
@examples(40)
@given(case=fused_cases(max_rows=4))
def test_fused_linear_kd_loss_kernels_match_fp64(backend, case):
    check_fused(case, backend)


@pytest.mark.parametrize("backend", REFERENCE_AND_CPU)
@examples(40)
@given(case=kd_cases(), fused=fused_cases())
def test_loss_is_fp32(backend, case, fused):
    """The loss comes back in fp32 for fp32, bf16 and fp16 inputs, so that a sum over many
    tokens cannot overflow a half-precision type (docs/design.md §1)."""
    student, teacher, labels, weights, _ = build_kd(case)
    loss = fastkd.kd_loss(
        student, teacher, labels, token_weights=weights, backend=backend, **case.options
    )
    hidden, weight, bias, teacher, labels, weights, _ = build_fused(fused)
    fused_loss = fastkd.fused_linear_kd_loss(
        hidden,
        weight,
        labels,
        student_bias=bias,
        token_weights=weights,
        backend=backend,
        **teacher,
        **fused.options,
    )
    assert (loss.dtype, fused_loss.dtype) == (torch.float32, torch.float32)


def test_fp64_inputs_give_an_fp64_loss():
    student, teacher = (
        torch.randn(3, 5, dtype=torch.float64),
        torch.randn(3, 5, dtype=torch.float64),
    )
    assert fastkd.kd_loss(student, teacher, torch.tensor([0, 1, 2])).dtype == torch.float64


# A case the tolerance model must not let through with a small change of one option: the
# model is tight enough to see a relative change of 1e-3 in T, a weight or beta.
SMALL_CHANGE_CASE = KDCase(
    n=6,
    v=33,
    vt=33,
    dtype=torch.float32,
    seed=3,
    options={
        "divergence": "jsd",
        "temperature": 2.0,
        "alpha": 0.5,
        "beta": 0.3,
        "reduction": "mean",
        "ignore_index": -100,
    },
    ignored=(False, True, False, False, False, False),
    token_weights=(1.0, 1.0, 0.5, 2.0, 0.0, 1.0),
)


@pytest.mark.parametrize(
    "change", [{"temperature": 2.002}, {"alpha": 0.5005}, {"beta": 0.3003}], ids=str
)
def test_the_tolerance_sees_small_changes(change):
    check_kd(SMALL_CHANGE_CASE, "reference")
    with pytest.raises(AssertionError, match="out of tolerance"):
        check_kd(SMALL_CHANGE_CASE, "reference", options={**SMALL_CHANGE_CASE.options, **change})
