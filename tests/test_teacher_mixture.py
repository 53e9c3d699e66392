"""Probability mixture of teachers (``teacher_mixture`` of fused_linear_kd_loss, the Distiller's
multi_teacher="mixture"): p = sum_k w_k softmax(x_k / T), against that sum written out in fp64."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_close, device_for, kernel_backends, tolerance

import fastkd
from fastkd.memory import peak_memory_bytes
from fastkd.reference import mixture_logits

BACKENDS = [pytest.param("reference", id="reference"), *kernel_backends()]


def make_teachers(n=29, hs=12, ht=(20, 16, 8), v=211, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = {
        "student_hidden": torch.randn(n, hs, generator=g),
        "student_weight": torch.randn(v, hs, generator=g) * 0.5,
        "student_bias": torch.randn(v, generator=g) * 0.1,
    }
    teachers = [
        (
            torch.randn(n, h, generator=g),
            torch.randn(v, h, generator=g) * (0.3 + 0.3 * k),  # unlike sharpness
            torch.randn(v, generator=g) * 0.1 if k != 1 else None,
        )
        for k, h in enumerate(ht)
    ]
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.2] = -100
    return student, teachers, labels


def teacher_logits(teachers, dtype=torch.float64):
    return [
        (h.to(dtype) @ w.to(dtype).t()) + (0 if b is None else b.to(dtype)) for h, w, b in teachers
    ]


def truth_teacher(teachers, weights, temperature, scale=1.0, softcap=None):
    """T log sum_k w_k softmax(x_k / T), with the probabilities summed as probabilities."""
    total = sum(weights)
    p = 0.0
    for z, w in zip(teacher_logits(teachers), weights):
        x = z * scale
        if softcap:
            x = softcap * torch.tanh(x / softcap)
        p = p + (w / total) * torch.softmax(x / temperature, -1)
    return temperature * torch.log(p)


def run(backend, student, teachers, labels, weights, *, as_logits=False, grad_out=None, **kw):
    device = device_for(backend)
    s = [t.to(device).clone().requires_grad_(True) for t in student.values()]
    if as_logits:
        given = {"teacher_logits": [z.float().to(device) for z in teacher_logits(teachers)]}
    else:
        given = {
            "teacher_hidden": [h.to(device) for h, _, _ in teachers],
            "teacher_weight": [w.to(device) for _, w, _ in teachers],
            "teacher_bias": [None if b is None else b.to(device) for _, _, b in teachers],
        }
    loss = fastkd.fused_linear_kd_loss(
        s[0], s[1], labels.to(device), student_bias=s[2], teacher_mixture=weights,
        backend=backend, **given, **kw,
    )  # fmt: skip
    loss.backward(torch.ones_like(loss) if grad_out is None else grad_out.to(loss))
    return loss.detach().cpu(), [t.grad.cpu() for t in s]


def truth(student, teachers, labels, weights, *, grad_out=None, **kw):
    s = [t.double().requires_grad_(True) for t in student.values()]
    zs = s[0] @ s[1].t() + s[2]
    kw.pop("chunk_size", None)
    t = kw.setdefault("temperature", fastkd.LossOptions().temperature)
    zt = truth_teacher(
        teachers, weights, t, kw.pop("teacher_logit_scale", 1.0), kw.pop("teacher_softcap", None)
    )
    loss = fastkd.kd_loss(zs, zt, labels, backend="reference", **kw)
    loss.backward(torch.ones_like(loss) if grad_out is None else grad_out.double())
    return loss.detach(), [x.grad for x in s]


def check(backend, weights, *, as_logits=False, **kw):
    student, teachers, labels = make_teachers()
    loss, grads = run(backend, student, teachers, labels, weights, as_logits=as_logits, **kw)
    t_loss, t_grads = truth(student, teachers, labels, weights, **kw)
    tol = tolerance(backend, torch.float32, student["student_weight"].shape[0], **kw)
    tol = {k: v + 2e-5 for k, v in tol.items()}  # the fp32 GEMMs and the mixture's log-sum-exp
    assert_close(loss, t_loss, name="loss", **tol)
    for name, g, t in zip(("hidden", "weight", "bias"), grads, t_grads):
        assert_close(g, t, name=f"grad {name}", **tol)


def test_reference_mixture_is_the_mixture_of_probabilities():
    _, teachers, _ = make_teachers()
    z = teacher_logits(teachers)
    for weights, t, scale, cap in (([1, 2, 3], 1.0, 1.0, None), ([0.5, 0, 2], 2.5, 0.7, 3.0)):
        got = mixture_logits(z, weights, t, scale, cap or 0.0)
        assert_close(got, truth_teacher(teachers, weights, t, scale, cap), atol=1e-12, rtol=1e-12)
        assert_close(torch.softmax(got / t, -1).sum(-1), torch.ones(z[0].shape[0]), atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("as_logits", [False, True], ids=["teacher-head", "teacher-logits"])
def test_matches_the_fp64_mixture(backend, divergence, as_logits):
    check(
        backend, [3.0, 1.0, 0.5], as_logits=as_logits, temperature=1.7, alpha=0.3,
        divergence=divergence,
    )  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_transform_chunks_reductions(backend):
    check(backend, [1, 1, 2], temperature=0.8, teacher_logit_scale=1.5, teacher_softcap=4.0)
    check(backend, [2, 1, 1], chunk_size=5, reduction="sum", alpha=0.0, temperature=3.0)
    n = make_teachers()[0]["student_hidden"].shape[0]
    grad_out = torch.rand(n, generator=torch.Generator().manual_seed(1))
    check(backend, [1, 3, 1], chunk_size=7, reduction="none", grad_out=grad_out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_teacher_and_a_weight_of_zero(backend):
    """A one-teacher mixture is that teacher; a teacher of weight 0 is never computed (its
    NaN hidden states do not reach the loss)."""
    student, teachers, labels = make_teachers(ht=(20, 16))
    device = device_for(backend)
    s = [t.to(device) for t in student.values()]
    h, w, b = (t.to(device) for t in teachers[0])
    kw = dict(temperature=2.0, alpha=0.2, backend=backend)
    plain = fastkd.fused_linear_kd_loss(
        s[0], s[1], labels.to(device), student_bias=s[2], teacher_hidden=h, teacher_weight=w,
        teacher_bias=b, **kw,
    )  # fmt: skip
    nan = torch.full_like(teachers[1][0], math.nan).to(device)
    for mixture, extra in (([2.0], []), ([1.0, 0.0], [(nan, teachers[1][1].to(device), None)])):
        hs, ws, bs = zip((h, w, b), *extra)
        mixed = fastkd.fused_linear_kd_loss(
            s[0], s[1], labels.to(device), student_bias=s[2], teacher_hidden=list(hs),
            teacher_weight=list(ws), teacher_bias=list(bs), teacher_mixture=mixture, **kw,
        )  # fmt: skip
        torch.testing.assert_close(mixed, plain, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize(
    "mixture, change, error, match",
    [
        ([1.0, -1.0], {}, ValueError, "non-negative"),
        ([0.0, 0.0], {}, ValueError, "positive sum"),
        ([1.0, math.inf], {}, ValueError, "finite"),
        ([1.0, True], {}, ValueError, "finite non-negative numbers"),
        (torch.ones(2), {}, TypeError, "list of weights"),
        ([1.0, 1.0, 1.0], {}, ValueError, "3 weights but teacher_hidden has 2"),
        ([1.0, 1.0], {"teacher_hidden": "tensor"}, TypeError, "list of 2 tensors"),
        ([1.0, 1.0], {"vocab": 7}, ValueError, "share one vocabulary"),
        ([1.0, 1.0], {"width": 5}, ValueError, "teacher 1 of teacher_mixture: teacher_weight"),
    ],
)
def test_bad_input(mixture, change, error, match):
    student, teachers, labels = make_teachers(ht=(20, 16))
    hidden = [h for h, _, _ in teachers]
    weight = [w for _, w, _ in teachers]
    if change.get("teacher_hidden"):
        hidden = hidden[0]
    if "vocab" in change:
        weight[1] = weight[1][: change["vocab"]]
    if "width" in change:
        weight[1] = weight[1][:, : change["width"]]
    with pytest.raises(error, match=match):
        fastkd.fused_linear_kd_loss(
            student["student_hidden"], student["student_weight"], labels,
            teacher_hidden=hidden, teacher_weight=weight, teacher_mixture=mixture,
        )  # fmt: skip


def test_forward_kl_of_the_mixture_has_the_gradient_of_the_summed_losses():
    """Sum_k w_k KL(p_k || q) = KL(sum_k w_k p_k || q) + a constant (docs/design.md §5): the
    multi_teacher modes "mixture" and "losses" train alike under forward KL, and only there."""
    student, teachers, labels = make_teachers(ht=(20, 16))
    weights = [0.7, 0.3]
    s = [t.double().requires_grad_(True) for t in student.values()]
    z = teacher_logits(teachers)
    kw = dict(temperature=1.5, backend="reference", labels=labels, student_bias=s[2])
    for divergence, same in (("kl", True), ("reverse_kl", False)):
        mixed = fastkd.fused_linear_kd_loss(
            s[0], s[1], teacher_logits=z, teacher_mixture=weights, kd_weight=1.0, ce_weight=0.0,
            divergence=divergence, **kw,
        )  # fmt: skip
        g_mixed = torch.autograd.grad(mixed, s)
        summed = sum(
            fastkd.fused_linear_kd_loss(
                s[0],
                s[1],
                teacher_logits=zk,
                kd_weight=w,
                ce_weight=0.0,
                divergence=divergence,
                **kw,
            )
            for zk, w in zip(z, weights)
        )
        g_summed = torch.autograd.grad(summed, s)
        assert float((summed - mixed).detach()) > 1e-3  # H(mixture) - sum_k w_k H(p_k) > 0
        close = all(torch.allclose(a, b, rtol=1e-9, atol=1e-12) for a, b in zip(g_mixed, g_summed))
        assert close == same, divergence


def test_module_checks_the_weights_at_construction_and_mixes():
    with pytest.raises(ValueError, match="positive sum"):
        fastkd.FusedLinearKDLoss(teacher_mixture=[0, 0])
    student, teachers, labels = make_teachers(ht=(20, 16))
    hidden, weight, bias = (list(t) for t in zip(*teachers))
    module = fastkd.FusedLinearKDLoss(teacher_mixture=[1, 2], temperature=1.5, backend="reference")
    got = module(
        *list(student.values())[:2], labels, teacher_hidden=hidden, teacher_weight=weight,
        teacher_bias=bias, student_bias=student["student_bias"],
    )  # fmt: skip
    expected = fastkd.fused_linear_kd_loss(
        *list(student.values())[:2], labels, teacher_hidden=hidden, teacher_weight=weight,
        teacher_bias=bias, student_bias=student["student_bias"], teacher_mixture=[1, 2],
        temperature=1.5, backend="reference",
    )  # fmt: skip
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


MEMORY_SETUP = """
    import torch, fastkd
    n, v, h = {n}, 32000, 64
    torch.manual_seed(0)
    hs = torch.randn(n, h, requires_grad=True)
    ws = (torch.randn(v, h) * 0.1).requires_grad_(True)
    ht = [torch.randn(n, h) for _ in range(3)]
    wt = [torch.randn(v, h) * 0.1 for _ in range(3)]
    y = torch.randint(0, v, (n,))
    def run(k):
        fastkd.fused_linear_kd_loss(hs[:k], ws, y[:k], teacher_hidden=[t[:k] for t in ht],
                                    teacher_weight=wt, teacher_mixture=[1, 2, 3]).backward()
        hs.grad = ws.grad = None
    run(64)  # load the kernels, start the thread pool
"""


@pytest.mark.slow
@pytest.mark.skipif(not fastkd.backends()["cpu"].available, reason="C++ backend not built")
def test_mixture_extra_memory_is_bounded_and_independent_of_n():
    """Three teachers mixed: peak memory of fwd + bwd beyond the inputs (fresh process) is one
    chunk's buffers, far below one [N, V] fp32 tensor, and the same at N = 2048 and 8192."""
    extra = {n: peak_memory_bytes(MEMORY_SETUP.format(n=n), f"run({n})") for n in (2048, 8192)}
    # A default chunk (512 rows) of the student's logits and the mixture's two teacher buffers
    # plus the log-sum-exp's temporary, whatever N: a third of [N, V] at N = 8192.
    assert extra[8192] < 8192 * 32000 * 4 / 3, extra
    assert extra[8192] < extra[2048] + 16 * 2**20, extra
