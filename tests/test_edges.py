"""Numeric edges (issue 11, docs/design.md §3): masked logits against underflowing partners,
infinite divergences and their gradient, a subnormal skew, logits near the dtype's maximum, and
no NaN anywhere unless an input is NaN. Every backend against the fp64 reference, whose
convention is checked here too against the plain math of the rows."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_close, device_for, kernel_backends, tolerance

import fastkd
from fastkd._options import DIVERGENCES
from fastkd.reference import LOG_MIN

INF = math.inf
BACKENDS = [pytest.param("reference", id="reference"), *kernel_backends()]


def loss_and_grad(backend, student, teacher, labels=None, *, dtype=None, **kw):
    """Per-row loss and student gradient of kd_loss at ``dtype`` (the inputs' by default)."""
    dev = device_for(backend) if backend != "reference" else student.device
    s = student.detach().to(dev, dtype or student.dtype).requires_grad_(True)
    t = teacher.detach().to(dev, dtype or teacher.dtype)
    y = None if labels is None else labels.to(dev)
    loss = fastkd.kd_loss(s, t, y, backend=backend, reduction="none", **kw)
    loss.sum().backward()
    return loss.detach().cpu(), s.grad.cpu()


def check(backend, student, teacher, labels=None, *, dtype=torch.float32, **kw):
    """The backend at ``dtype`` against the fp64 reference: infinities equal, no NaN, the rest
    within the tolerance of docs/design.md §7 plus what plain PyTorch (the reference) loses at
    ``dtype``. Above T = 10 the tolerance grows as T^2: the KD term is T^2 D, and D is off by
    the fp32 rounding of the stats' log-sum-exps."""
    loss, grad = loss_and_grad(backend, student, teacher, labels, dtype=dtype, **kw)
    truth = loss_and_grad("reference", student.double(), teacher.double(), labels, **kw)
    baseline = loss_and_grad("reference", student, teacher, labels, dtype=dtype, **kw)
    assert not loss.isnan().any() and not grad.isnan().any(), (loss, grad)
    tol = tolerance(backend, dtype, student.shape[-1], **kw)
    scale = max(1.0, (kw.get("temperature", 1.0) / 10) ** 2)
    tol = {k: v * scale for k, v in tol.items()}
    for actual, t, base, name in zip((loss, grad), truth, baseline, ("loss", "grad"), strict=True):
        inf = torch.isinf(t)  # compared exactly; assert_close takes the finite rest
        assert torch.equal(actual.double()[inf], t[inf]), (name, actual, t)
        zero = torch.zeros((), dtype=t.dtype)
        args = (torch.where(inf, zero, x.double()) for x in (actual, t, base))
        assert_close(*args, name=name, **tol)
    return loss, grad, *truth


def plain_kl(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """sum p (log p - log q) over the columns where p > 0, in fp64 (the textbook definition)."""
    p = lp.exp()
    live = p > 0
    return torch.where(live, p * (lp - lq), 0.0).sum(-1)


def test_log_min_is_where_fp64_underflows():
    """LOG_MIN, the kernels' kLogMin: e^x is the last positive fp64 just above it, 0 at it."""
    x = torch.tensor([LOG_MIN, LOG_MIN + 1e-9], dtype=torch.float64)
    assert x.exp().tolist()[0] == 0.0 and x.exp().tolist()[1] > 0.0


# --- 1. forward KL: a masked student logit where the teacher's probability underflows -----------


def masked_student_rows():
    g = torch.Generator().manual_seed(1)
    student = torch.randn(3, 67, generator=g) * 2
    teacher = torch.randn(3, 67, generator=g) * 2
    student[:, 5] = -INF
    teacher[:, 5] = -1e9  # finite, but e^(-1e9 - lse) is 0 even in fp64
    student[1, 60:] = -INF  # several masked columns, the teacher very negative at all of them
    teacher[1, 60:] = -1e6
    return student, teacher


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_kl_masked_student_against_underflowing_teacher(backend, temperature, alpha):
    student, teacher = masked_student_rows()
    labels = torch.tensor([0, 1, 2])
    loss, _, t_loss, _ = check(
        backend, student, teacher, labels, divergence="kl", temperature=temperature, alpha=alpha
    )
    assert torch.isfinite(loss).all()
    # The truth itself: the KL of the rows, where the underflowing teacher columns count as 0.
    lp = torch.log_softmax(teacher.double() / temperature, -1)
    lq = torch.log_softmax(student.double() / temperature, -1)
    kd = (1 - alpha) * temperature**2 * plain_kl(lp, lq)
    ce = alpha * torch.nn.functional.cross_entropy(student.double(), labels, reduction="none")
    torch.testing.assert_close(t_loss, kd + ce)


# --- 2. reverse KL: a masked teacher logit where the student's probability underflows -----------


def masked_teacher_rows(student_logit):
    """Row 0: the teacher masks a column where the student has the logit ``student_logit``
    against others near 0; row 1: an ordinary row."""
    g = torch.Generator().manual_seed(2)
    student = torch.randn(2, 33, generator=g) * 0.5
    teacher = torch.randn(2, 33, generator=g)
    student[0, 7] = student_logit
    teacher[0, 7] = -INF
    return student, teacher


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_reverse_kl_masked_teacher_against_underflowing_student(backend, alpha):
    """log q = -150 - lse: 0 in fp32, positive in fp64, so KL(q || p) is +inf. The row gets no
    KD gradient (docs/design.md §3); its CE gradient stays."""
    student, teacher = masked_teacher_rows(-150.0)
    labels = torch.tensor([3, 4])
    kw = dict(divergence="reverse_kl", alpha=alpha, temperature=1.0)
    loss, grad, _, _ = check(backend, student, teacher, labels, **kw)
    assert loss[0] == INF and torch.isfinite(loss[1])
    if alpha == 0.0:
        assert (grad[0] == 0).all()
    else:
        _, ce_grad = loss_and_grad(
            "reference", student.double(), teacher.double(), labels, ce_weight=alpha, kd_weight=0.0
        )
        torch.testing.assert_close(grad[0].double(), ce_grad[0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reverse_kl_probability_below_fp64_range_counts_as_zero(backend):
    """log q < ln 2^-1075 (-800 here): q is 0 in fp64 too, the term is 0 and the KL finite."""
    student, teacher = masked_teacher_rows(-800.0)
    kw = dict(divergence="reverse_kl", alpha=0.0, temperature=1.0)
    loss, _, t_loss, _ = check(backend, student, teacher, **kw)
    assert torch.isfinite(loss).all()
    lq = torch.log_softmax(student.double(), -1)
    lp = torch.log_softmax(teacher.double(), -1)
    torch.testing.assert_close(t_loss, plain_kl(lq, lp))


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_infinite_row_gets_no_kd_gradient(backend):
    """Forward KL with a student -inf where the teacher has mass: +inf, and no KD gradient."""
    student, teacher = masked_student_rows()
    teacher[0, 5] = 3.0  # the teacher has mass on the student's masked column
    loss, grad, _, _ = check(backend, student, teacher, divergence="kl", alpha=0.0)
    assert loss[0] == INF and torch.isfinite(loss[1:]).all()
    assert (grad[0] == 0).all() and grad[1:].abs().sum() > 0


# --- 3. skew divergences with a subnormal skew ------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["skew_kl", "skew_reverse_kl", "jsd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_subnormal_mixture_weight(backend, divergence, dtype):
    """skew (beta) = 1e-39 is an fp32 subnormal; with a teacher -inf where the student has mass,
    mix * e^(2 lq - lm) overflowed. The kernels take the weights as logs."""
    g = torch.Generator().manual_seed(3)
    student = torch.randn(4, 33, generator=g) * 3
    teacher = torch.randn(4, 33, generator=g) * 3
    teacher[:2, 0] = -INF
    student[2, 1] = -INF
    weight = {"beta": 1e-39} if divergence == "jsd" else {"skew": 1e-39}
    _, grad, _, _ = check(
        backend, student, teacher, dtype=dtype, divergence=divergence, alpha=0.0, **weight
    )
    assert torch.isfinite(grad).all()


# --- 4. logits near the dtype's maximum -------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0, 2.0])
def test_fp32_extremes_student_equals_teacher(backend, divergence, temperature):
    """+-3e38 logits (x / T overflows for T < 1): student == teacher gives D = 0 (up to the
    rounding of the mixtures' logs) and no KD gradient, however the row's magnitude. No ties at
    the top: the stats' fp32 T lse(x / T) cannot hold the log of the sum next to 3e38, so tied
    maxima there each get probability 1 in the backward (docs/design.md §3)."""
    x = torch.tensor(
        [[3e38, -3e38, 1.0, 0.0, -1.0], [3e38, 1e38, -3e38, -1e38, 0.0], [-3e38] * 4 + [1e38]]
    )
    check(backend, x, x.clone(), divergence=divergence, temperature=temperature, alpha=0.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.5, 1.0])
def test_fp32_extremes_with_ce(backend, temperature):
    """A single largest logit of 3e38 (x / T overflows at T = 0.5), with the CE: the softmax is
    one-hot, the CE of a label at the max is 0 and elsewhere about 3e38 or 6e38 (+inf in fp32)."""
    x = torch.tensor([[3e38, -3e38, 1.0, 0.0], [2e38, -1e38, 3e38, 0.0]])
    t = torch.tensor([[3e38, 2e38, 1.0, 0.0], [0.0, -1e38, 3e38, 2.0]])
    loss, _, t_loss, _ = check(
        backend, x, t, torch.tensor([0, 3]), temperature=temperature, divergence="kl"
    )
    assert loss[0] == 0 and t_loss[0] == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [0.1, 1.0])
def test_fp16_near_max(backend, divergence, temperature):
    """fp16 logits at +-65504 (its max) and near it, student and teacher different."""
    g = torch.Generator().manual_seed(4)
    student = torch.randn(3, 40, generator=g) * 3
    teacher = torch.randn(3, 40, generator=g) * 3
    student[0, :3] = torch.tensor([65504.0, -65504.0, 65000.0])
    teacher[0, :3] = torch.tensor([65504.0, 65000.0, -65504.0])
    student[1] += 65000.0  # a shifted row: the softmax only sees differences
    teacher[2, 0] = -65504.0
    check(
        backend,
        student.half().float(),
        teacher.half().float(),
        torch.tensor([0, 1, 2]),
        dtype=torch.float16,
        divergence=divergence,
        temperature=temperature,
        beta=0.3,
        skew=0.2,
    )


# --- 5. no NaN anywhere, the edges together ---------------------------------------------------


def edge_rows(dtype):
    """Rows with every edge above at once, in the range of ``dtype``."""
    g = torch.Generator().manual_seed(5)
    student = torch.randn(8, 45, generator=g) * 3
    teacher = torch.randn(8, 45, generator=g) * 3
    student[0, 3], teacher[0, 3] = -INF, -1e9  # masked student, underflowing teacher
    teacher[1, 5], student[1, 5] = -INF, -150.0  # masked teacher, student underflowing in fp32
    student[2, 7], teacher[2, 7] = -INF, -INF  # masked in both
    teacher[3, :10] = -INF  # the teacher masks a block where the student has mass
    student[4, 10:20] = -INF  # the student masks a block where the teacher has mass
    student[5, 0], teacher[5, 0] = 40.0, -40.0  # large, opposite
    student[6] *= 10
    teacher[7, 1:] = -INF  # a one-hot teacher
    if dtype == torch.float16:
        student[0, 3], teacher[0, 3] = -INF, -60000.0
    return student.to(dtype).float(), teacher.to(dtype).float()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("alpha", [0.0, 0.5])
@pytest.mark.parametrize("temperature", [0.1, 1.0, 20.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_no_nan(backend, divergence, alpha, temperature, dtype):
    student, teacher = edge_rows(dtype)
    labels = torch.arange(8) * 5
    check(
        backend,
        student,
        teacher,
        labels,
        dtype=dtype,
        divergence=divergence,
        alpha=alpha,
        temperature=temperature,
        beta=0.3,
        skew=0.2,
    )


# --- the fused linear path runs the same row kernels -----------------------------------------


def fused(backend, h, w, b, teacher_logits, dtype, **kw):
    """Loss per row and the gradients of h, W and b of fused_linear_kd_loss."""
    h, w, b = (x.detach().to(dtype).requires_grad_(True) for x in (h, w, b))
    loss = fastkd.fused_linear_kd_loss(
        h,
        w,
        student_bias=b,
        teacher_logits=teacher_logits.to(dtype),
        backend=backend,
        reduction="none",
        **kw,
    )
    loss.sum().backward()
    return loss.detach(), h.grad, w.grad, b.grad


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize(
    "divergence, student_bias, teacher_logit, infinite",
    [
        ("kl", -INF, -1e9, False),  # case 1: the student masked by its bias
        ("kl", -INF, 2.0, True),
        ("reverse_kl", -150.0, -INF, True),  # case 2
        ("reverse_kl", -800.0, -INF, False),
    ],
)
def test_fused_linear_edges(backend, divergence, student_bias, teacher_logit, infinite):
    if backend == "cpu" and not fastkd.backends()["cpu"].available:
        pytest.skip(fastkd.backends()["cpu"].reason)
    g = torch.Generator().manual_seed(6)
    h = torch.randn(5, 16, generator=g) * 0.3
    w = torch.randn(37, 16, generator=g) * 0.3
    b = torch.zeros(37)
    b[4] = student_bias
    teacher = torch.randn(5, 37, generator=g)
    teacher[:, 4] = teacher_logit
    kw = dict(divergence=divergence, alpha=0.0, temperature=1.0, chunk_size=2)
    loss, *grads = fused(backend, h, w, b, teacher, torch.float32, **kw)
    t_loss, *t_grads = fused("reference", h, w, b, teacher, torch.float64, **kw)
    assert not loss.isnan().any() and not any(x.isnan().any() for x in grads)
    assert bool((loss == INF).all()) if infinite else bool(torch.isfinite(loss).all())
    tol = tolerance(backend, torch.float32, 37)
    assert_close(loss, t_loss, name="loss", **tol)
    for x, t, name in zip(grads, t_grads, ("grad_h", "grad_w", "grad_b"), strict=True):
        assert_close(x, t, name=name, **tol)
