"""kd_loss / KDLoss: every kernel backend against the fp64 reference, plus the API contract."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, device_for, kernel_backends, tolerance

import fastkd
from fastkd._options import DIVERGENCES, LossOptions
from fastkd.reference import kd_loss_rows

BACKENDS = kernel_backends()


def make_inputs(n, v, *, vt=None, seed=0, scale=3.0, ignore_frac=0.25, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(n, v, generator=g) * scale
    teacher = torch.randn(n, vt or v, generator=g) * scale
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < ignore_frac] = -100
    return student.to(device), teacher.to(device), labels.to(device)


def loss_and_grad(student, teacher, labels, *, dtype=None, grad_out=None, **kw):
    """Loss and student gradient of kd_loss on copies of the inputs cast to ``dtype``."""
    dtype = dtype or student.dtype
    s = student.detach().to(dtype).requires_grad_(True)
    loss = fastkd.kd_loss(s, teacher.detach().to(dtype), labels, **kw)
    loss.backward(grad_out if grad_out is not None else torch.ones_like(loss))
    return loss.detach(), s.grad


def check_backend(backend, student, teacher, labels, *, dtype=torch.float32, grad_out=None, **kw):
    """Backend at ``dtype`` vs fp64 truth, allowing what the reference itself loses at ``dtype``."""
    dev = device_for(backend)
    student, teacher = student.to(dev), teacher.to(dev)
    labels = None if labels is None else labels.to(dev)
    if grad_out is not None:
        grad_out = grad_out.to(dev)
    loss, grad = loss_and_grad(
        student, teacher, labels, dtype=dtype, backend=backend, grad_out=grad_out, **kw
    )
    t_loss, t_grad = loss_and_grad(
        student.cpu(),
        teacher.cpu(),
        None if labels is None else labels.cpu(),
        dtype=torch.float64,
        backend="reference",
        grad_out=None if grad_out is None else grad_out.double().cpu(),
        **kw,
    )
    baseline = None
    if dtype != torch.float32:
        baseline = loss_and_grad(
            student.cpu(),
            teacher.cpu(),
            None if labels is None else labels.cpu(),
            dtype=dtype,
            backend="reference",
            grad_out=None if grad_out is None else grad_out.cpu(),
            **kw,
        )
    assert loss.dtype == torch.float32 and grad.dtype == dtype  # the loss in fp32, always
    tol = tolerance(backend, dtype, student.shape[-1], **kw)
    assert_close(loss, t_loss, None if baseline is None else baseline[0], name="loss", **tol)
    assert_close(grad, t_grad, None if baseline is None else baseline[1], name="grad", **tol)
    return loss, grad


# --- kernels against the fp64 reference -------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 10.0])
def test_matches_reference(backend, divergence, alpha, temperature):
    seed = 10 * DIVERGENCES.index(divergence) + int(2 * alpha)
    student, teacher, labels = make_inputs(7, 1031, seed=seed)
    check_backend(
        backend,
        student,
        teacher,
        labels,
        divergence=divergence,
        alpha=alpha,
        temperature=temperature,
        beta=0.3,
        skew=0.2,
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["kl", "jsd", "skew_reverse_kl"])
def test_large_odd_vocab(backend, divergence):
    student, teacher, labels = make_inputs(3, 70001, ignore_frac=0.0, scale=4.0)
    check_backend(backend, student, teacher, labels, divergence=divergence, alpha=0.5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_low_precision_inputs(backend, dtype, divergence):
    student, teacher, labels = make_inputs(5, 1031, seed=3)
    check_backend(backend, student, teacher, labels, dtype=dtype, divergence=divergence)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_masked_vocabulary_is_finite(backend, divergence):
    """-inf in the same columns of both models (a masked vocabulary) is legal."""
    student, teacher, labels = make_inputs(6, 1031, seed=5)
    masked = torch.arange(1031) % 7 == 3
    student[:, masked] = -math.inf
    teacher[:, masked] = -math.inf
    labels[labels % 7 == 3] = 0
    loss, grad = check_backend(backend, student, teacher, labels, divergence=divergence)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert (grad[:, masked] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["kl", "jsd", "tvd", "skew_kl"])
def test_teacher_only_masked(backend, divergence):
    """Teacher -inf where the student has mass: finite for the divergences that allow p = 0."""
    student, teacher, labels = make_inputs(4, 1031, seed=6)
    teacher[:, :200] = -math.inf
    loss, _ = check_backend(backend, student, teacher, labels, divergence=divergence)
    assert torch.isfinite(loss).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_student_only_masked(backend, divergence):
    """Student -inf where the teacher has mass: infinite forward KL (and finite otherwise), and
    no gradient into the masked entries, the rest of the gradient as the reference's."""
    student, teacher, labels = make_inputs(4, 1031, seed=8)
    student[:, :200] = -math.inf
    labels[labels < 200] = 500
    loss, grad = check_backend(backend, student, teacher, labels, divergence=divergence)
    assert torch.isinf(loss).all() == (divergence == "kl")
    assert torch.isfinite(grad).all() and (grad[:, :200] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_batch(backend):
    student, teacher, labels = make_inputs(4, 1031)
    labels[:] = -100
    student[0, :5] = math.nan  # ignored rows must not be read
    for reduction in ("mean", "sum", "none", "batchmean"):
        loss, grad = loss_and_grad(student, teacher, labels, backend=backend, reduction=reduction)
        assert (loss == 0).all() and (grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_weight_term_is_skipped(backend):
    """alpha=1 is plain CE: the teacher is not read (NaN there changes nothing); alpha=0
    without labels is plain KD."""
    student, teacher, labels = make_inputs(5, 1031, seed=7)
    ce, ce_grad = loss_and_grad(
        student, torch.full_like(teacher, math.nan), labels, backend=backend, alpha=1.0
    )
    s = student.double().requires_grad_(True)
    expected = F.cross_entropy(s, labels, ignore_index=-100)
    expected.backward()
    assert_close(ce, expected, name="loss")
    assert_close(ce_grad, s.grad, name="grad")
    check_backend(backend, student, teacher, None, alpha=0.0, divergence="skew_kl")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none", "batchmean"])
def test_grad_output_and_reductions(backend, reduction):
    student, teacher, labels = make_inputs(9, 1031, seed=8)
    grad_out = torch.randn(9) if reduction == "none" else torch.tensor(3.7)
    check_backend(
        backend,
        student,
        teacher,
        labels,
        reduction=reduction,
        grad_out=grad_out,
        divergence="jsd",
        alpha=0.4,
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_weights_and_3d(backend):
    g = torch.Generator().manual_seed(9)
    student = torch.randn(2, 5, 1031, generator=g)
    teacher = torch.randn(2, 5, 1031, generator=g)
    labels = torch.randint(0, 1031, (2, 5), generator=g)
    labels[0, 1] = -100
    weights = torch.rand(2, 5, generator=g)
    check_backend(backend, student, teacher, labels, token_weights=weights, divergence="tvd")
    loss = fastkd.kd_loss(
        student, teacher, labels, token_weights=weights, reduction="none", backend=backend
    )
    assert loss.shape == (2, 5) and loss[0, 1] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    g = torch.Generator().manual_seed(10)
    wide = torch.randn(6, 1100, generator=g)
    student = wide[:, 3:1034]  # row stride 1100
    teacher = torch.randn(1031, 6, generator=g).t()  # columns not contiguous
    labels = torch.randint(0, 1031, (12,), generator=g)[::2]
    assert not student.is_contiguous() and not teacher.is_contiguous()
    check_backend(backend, student, teacher, labels, divergence="reverse_kl")


@pytest.mark.parametrize("backend", BACKENDS)
def test_broadcast_single_column(backend):
    # A [N, 1] view of a broadcast has last stride 0, which contiguous() keeps.
    student = torch.tensor([0.5, -1.0, 2.0]).as_strided((3, 1), (1, 0))
    teacher = torch.tensor([1.0, 0.0, -2.0]).as_strided((3, 1), (1, 0))
    assert student.stride(-1) == 0
    check_backend(backend, student, teacher, torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["kl", "skew_kl"])
def test_inplace_grad(backend, divergence):
    student, teacher, labels = make_inputs(5, 1031, seed=11)
    ref_loss, ref_grad = loss_and_grad(
        student, teacher, labels, backend=backend, divergence=divergence
    )
    buf = student.clone().requires_grad_(True)
    logits = buf * 1.0  # a non-leaf, like an lm_head output
    loss = fastkd.kd_loss(
        logits, teacher, labels, backend=backend, divergence=divergence, inplace_grad=True
    )
    (2.0 * loss).backward()
    assert torch.equal(loss.detach(), ref_loss)
    assert_close(buf.grad, 2.0 * ref_grad, atol=1e-7, rtol=1e-6, name="grad")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["truncate", "pad"])
def test_vocab_mismatch(backend, mode):
    student, teacher, labels = make_inputs(5, 1031, vt=1000, seed=12)
    labels[0] = 1030  # a label outside the teacher's vocabulary: CE still sees it
    check_backend(backend, student, teacher, labels, vocab=mode, divergence="jsd")


@pytest.mark.parametrize("backend", BACKENDS)
def test_truncate_larger_teacher(backend):
    student, teacher, labels = make_inputs(5, 1000, vt=1031, seed=13)
    check_backend(backend, student, teacher, labels, vocab="truncate")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "tvd"])
def test_logit_scale_and_softcap(backend, divergence):
    student, teacher, labels = make_inputs(5, 1031, seed=14, scale=20.0)
    student[:, 7] = -math.inf
    teacher[:, 7] = -math.inf
    check_backend(
        backend,
        student,
        teacher,
        labels,
        divergence=divergence,
        student_logit_scale=0.5,
        student_softcap=15.0,
        teacher_logit_scale=0.25,
        teacher_softcap=30.0,
    )


def test_reference_scale_and_softcap_semantics():
    """The reference applies scale, then cap * tanh(x / cap), to the raw logits."""
    student, teacher, labels = make_inputs(4, 50, seed=15, scale=20.0)
    opts = LossOptions(student_logit_scale=0.5, student_softcap=15.0, teacher_softcap=30.0)
    args, plain = opts.kernel_args(50, 50), LossOptions().kernel_args(50, 50)
    rows = kd_loss_rows(student.double(), teacher.double(), labels, None, args)
    s = 15.0 * torch.tanh(student.double() * 0.5 / 15.0)
    t = 30.0 * torch.tanh(teacher.double() / 30.0)
    assert torch.allclose(rows, kd_loss_rows(s, t, labels, None, plain))


# --- the math itself, against independent formulas -------------------------------------------


def handwritten_kd_loss(s, t, labels, alpha, temperature):
    """The README's "before": (1 - alpha) T^2 KL(batchmean) + alpha CE, on [N, V] logits."""
    kl = F.kl_div(
        F.log_softmax(s / temperature, -1),
        F.log_softmax(t / temperature, -1),
        reduction="batchmean",
        log_target=True,
    )
    return (1 - alpha) * temperature**2 * kl + alpha * F.cross_entropy(s, labels)


def test_parity_with_handwritten_kd_loss():
    """The drop-in claim: with no ignored label, the hand-written loss, value and gradient."""
    student, teacher, labels = make_inputs(16, 300, ignore_frac=0.0, seed=16)
    s = student.double().requires_grad_(True)
    t, a, temp = teacher.double(), 0.3, 4.0
    expected = handwritten_kd_loss(s, t, labels, a, temp)
    ours = fastkd.kd_loss(s, t, labels, temperature=temp, alpha=a)
    assert torch.allclose(ours, expected, rtol=1e-12)
    g1 = torch.autograd.grad(ours, s)[0]
    g2 = torch.autograd.grad(expected, s)[0]
    assert torch.allclose(g1, g2, rtol=1e-10, atol=1e-14)


def test_ignored_labels_leave_the_kl_term_too():
    """With ignored labels fastkd differs from the hand-written loss, whose F.kl_div sums the KL
    of every row: fastkd equals the hand-written loss on the counted rows alone."""
    student, teacher, labels = make_inputs(16, 300, ignore_frac=0.0, seed=22)
    labels[[2, 5, 11]] = -100
    s, t, a, temp = student.double(), teacher.double(), 0.3, 4.0
    ours = fastkd.kd_loss(s, t, labels, temperature=temp, alpha=a)
    keep = labels != -100
    assert torch.allclose(ours, handwritten_kd_loss(s[keep], t[keep], labels[keep], a, temp))
    assert not torch.allclose(ours, handwritten_kd_loss(s, t, labels, a, temp), rtol=1e-3)


def test_batchmean_divides_by_tokens():
    """fastkd's batchmean divides by the number of tokens N; torch.nn.KLDivLoss(batchmean)
    divides by input.size(0): equal for [N, V] input, a factor S apart for [B, S, V]."""
    g = torch.Generator().manual_seed(23)
    s = torch.randn(3, 5, 40, generator=g, dtype=torch.float64)
    t = torch.randn(3, 5, 40, generator=g, dtype=torch.float64)
    kldiv = torch.nn.KLDivLoss(reduction="batchmean", log_target=True)

    def ours(x, y):
        return fastkd.kd_loss(x, y, alpha=0.0, temperature=1.0, reduction="batchmean")

    def theirs(x, y):
        return kldiv(F.log_softmax(x, -1), F.log_softmax(y, -1))

    flat_s, flat_t = s.reshape(15, 40), t.reshape(15, 40)
    assert torch.allclose(ours(flat_s, flat_t), theirs(flat_s, flat_t), rtol=1e-12)
    assert torch.allclose(ours(s, t), ours(flat_s, flat_t), rtol=1e-12)
    assert torch.allclose(5 * ours(s, t), theirs(s, t), rtol=1e-12)


def test_jsd_matches_trl_formula():
    """Generalized JSD as TRL's GKD trainer computes it, including beta 0 and 1."""
    student, teacher, _ = make_inputs(8, 200, seed=17)
    s, t = student.double(), teacher.double()
    for beta in (0.0, 0.1, 0.5, 0.9, 1.0):
        lq, lp = F.log_softmax(s, -1), F.log_softmax(t, -1)
        if beta == 0.0:
            trl = F.kl_div(lq, lp, reduction="none", log_target=True)
        elif beta == 1.0:
            trl = F.kl_div(lp, lq, reduction="none", log_target=True)
        else:
            lm = torch.logsumexp(torch.stack([lq + math.log(1 - beta), lp + math.log(beta)]), 0)
            trl = beta * F.kl_div(lm, lp, reduction="none", log_target=True) + (
                1 - beta
            ) * F.kl_div(lm, lq, reduction="none", log_target=True)
        ours = fastkd.kd_loss(
            s, t, alpha=0.0, temperature=1.0, divergence="jsd", beta=beta, reduction="none"
        )
        assert torch.allclose(ours, trl.sum(-1), rtol=1e-10, atol=1e-12), beta


def test_other_divergences_match_definitions():
    student, teacher, _ = make_inputs(8, 200, seed=18)
    s, t = student.double(), teacher.double()
    p, q = F.softmax(t / 2, -1), F.softmax(s / 2, -1)
    lam = 0.3

    def kl(a, b):
        return (a * (a.log() - b.log())).sum(-1)

    expected = {
        "tvd": 0.5 * (p - q).abs().sum(-1),
        "skew_kl": kl(p, lam * p + (1 - lam) * q),
        "skew_reverse_kl": kl(q, lam * q + (1 - lam) * p),
        "reverse_kl": kl(q, p),
    }
    for name, d in expected.items():
        ours = fastkd.kd_loss(s, t, alpha=0.0, divergence=name, skew=lam, reduction="none")
        assert torch.allclose(ours, 4.0 * d, rtol=1e-10), name


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_reference_gradcheck(divergence):
    student, teacher, labels = make_inputs(3, 11, seed=19)
    s = student.double().requires_grad_(True)
    masked_t = teacher.double()
    if divergence != "reverse_kl":  # KL(q || p) is infinite where p = 0 < q
        masked_t[:, 0] = -math.inf  # exercise the p = 0 guards
    assert torch.autograd.gradcheck(
        lambda x: fastkd.kd_loss(
            x,
            masked_t,
            labels,
            divergence=divergence,
            alpha=0.3,
            reduction="none",
            backend="reference",
        ),
        (s,),
    )


# --- API -------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_matches_functional(backend):
    student, teacher, labels = make_inputs(6, 1031, seed=20)
    module = fastkd.KDLoss(temperature=3.0, alpha=0.2, divergence="jsd", beta=0.7, backend=backend)
    assert "temperature=3.0" in repr(module)
    got = module(student, teacher, labels)
    expected = fastkd.kd_loss(
        student,
        teacher,
        labels,
        temperature=3.0,
        alpha=0.2,
        divergence="jsd",
        beta=0.7,
        backend=backend,
    )
    assert torch.equal(got, expected)


def test_explicit_weights_equal_alpha():
    student, teacher, labels = make_inputs(6, 100, seed=21)
    a = fastkd.kd_loss(student, teacher, labels, alpha=0.25, backend="reference")
    b = fastkd.kd_loss(
        student, teacher, labels, kd_weight=0.75, ce_weight=0.25, backend="reference"
    )
    assert torch.allclose(a, b)
    pure_kd = fastkd.kd_loss(student, teacher, kd_weight=1.0, backend="reference")
    assert torch.allclose(pure_kd, fastkd.kd_loss(student, teacher, alpha=0.0, backend="reference"))


def test_default_backend_by_device(monkeypatch):
    student, teacher, labels = make_inputs(2, 10)
    from fastkd.backends import select_backend

    monkeypatch.delenv("FASTKD_BACKEND", raising=False)
    expected = "cpu" if fastkd.backends()["cpu"].available else "reference"
    assert select_backend(None, student.device, torch.float32) == expected
    assert select_backend(None, student.device, torch.float64) == "reference"
    monkeypatch.setenv("FASTKD_BACKEND", "reference")
    assert select_backend(None, student.device, torch.float32) == "reference"
    monkeypatch.setenv("FASTKD_BACKEND", "nope")
    with pytest.raises(ValueError, match="FASTKD_BACKEND"):
        fastkd.kd_loss(student, teacher, labels)


def test_backends_report():
    status = fastkd.backends()
    assert set(status) == {"triton", "cuda", "cpu", "reference"}
    assert status["reference"].available
    for s in status.values():
        assert isinstance(s.reason, str) and s.reason


def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    import subprocess
    import sys

    code = (
        "import torch, fastkd\n"
        "try:\n"
        "    fastkd.kd_loss(torch.randn(2, 8), torch.randn(2, 8), alpha=0.0, backend='triton')\n"
        "except RuntimeError as e:\n"
        "    print('ERR', e)\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert "ERR" in out.stdout and ("TRITON_INTERPRET" in out.stdout), out.stdout + out.stderr


# --- bad input -------------------------------------------------------------------------------

S, T, Y = torch.randn(4, 10), torch.randn(4, 10), torch.tensor([1, 2, 3, -100])


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: fastkd.kd_loss(S, T, Y, temperature=0.0), ValueError, "temperature"),
        (lambda: fastkd.kd_loss(S, T, Y, temperature=-1), ValueError, "temperature"),
        (lambda: fastkd.kd_loss(S, T, Y, temperature=math.nan), ValueError, "temperature"),
        (lambda: fastkd.kd_loss(S, T, Y, alpha=1.5), ValueError, "alpha"),
        (lambda: fastkd.kd_loss(S, T, Y, alpha=-0.1), ValueError, "alpha"),
        (lambda: fastkd.kd_loss(S, T, Y, alpha=0.5, kd_weight=1.0), ValueError, "alpha"),
        (lambda: fastkd.kd_loss(S, T, Y, kd_weight=-1.0), ValueError, "kd_weight"),
        (lambda: fastkd.kd_loss(S, T, Y, divergence="kld"), ValueError, "divergence"),
        (lambda: fastkd.kd_loss(S, T, Y, reduction="avg"), ValueError, "reduction"),
        (lambda: fastkd.kd_loss(S, T, Y, divergence="jsd", beta=1.5), ValueError, "beta"),
        (lambda: fastkd.kd_loss(S, T, Y, divergence="skew_kl", skew=1.0), ValueError, "skew"),
        (lambda: fastkd.kd_loss(S, T[:3], Y), ValueError, "teacher_logits shape"),
        (lambda: fastkd.kd_loss(S, T[:, :9], Y), ValueError, "vocab"),
        (lambda: fastkd.kd_loss(S, torch.randn(4, 12), Y, vocab="pad"), ValueError, "pad"),
        (lambda: fastkd.kd_loss(S, T, Y, vocab="shrink"), ValueError, "vocab"),
        (lambda: fastkd.kd_loss(S, T, Y[:3]), ValueError, "labels must have shape"),
        (lambda: fastkd.kd_loss(S, T, Y.float()), TypeError, "labels must be an int64 or int32"),
        (lambda: fastkd.kd_loss(S, T, torch.tensor([1, 2, 10, 0])), ValueError, r"labels\[2\]"),
        (lambda: fastkd.kd_loss(S, T, torch.tensor([1, -1, 0, 0])), ValueError, "labels"),
        (lambda: fastkd.kd_loss(S, T), ValueError, "labels=None"),
        (lambda: fastkd.kd_loss(S, T.double(), Y), TypeError, "dtype"),
        (lambda: fastkd.kd_loss(S.long(), T.long(), Y), TypeError, "student_logits must be"),
        (lambda: fastkd.kd_loss(S, "t", Y), TypeError, "teacher_logits must be a torch.Tensor"),
        (lambda: fastkd.kd_loss(S[0], T[0], Y[:1]), ValueError, r"\[N, V\]"),
        (lambda: fastkd.kd_loss(S, T, Y, token_weights=torch.ones(3)), ValueError, "token_weights"),
        (
            lambda: fastkd.kd_loss(S, T, Y, token_weights=torch.ones(4, dtype=torch.long)),
            TypeError,
            "token_weights",
        ),
        (lambda: fastkd.kd_loss(S, T, Y, backend="fast"), ValueError, "backend"),
        (lambda: fastkd.kd_loss(S.double(), T.double(), Y, backend="cpu"), TypeError, "float64"),
        (lambda: fastkd.kd_loss(S, T, Y, student_softcap=0.0), ValueError, "student_softcap"),
        (lambda: fastkd.kd_loss(S, T, Y, teacher_logit_scale=0), ValueError, "teacher_logit_scale"),
        (lambda: fastkd.kd_loss(S, T, Y, ignore_index=1.5), TypeError, "ignore_index"),
        (lambda: fastkd.KDLoss(temperature=0), ValueError, "temperature"),
        (lambda: fastkd.KDLoss(reduction="max"), ValueError, "reduction"),
        (lambda: fastkd.KDLoss(backend="fast"), ValueError, "backend"),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_device_mismatch():
    meta = torch.device("meta")
    with pytest.raises(ValueError, match="teacher_logits is on"):
        fastkd.kd_loss(S.to(meta), T, Y.to(meta))
    with pytest.raises(ValueError, match="labels is on"):
        fastkd.kd_loss(S, T, Y.to(meta))
