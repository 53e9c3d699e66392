"""The kernel ops as torch.library ops: registration checks (opcheck) and torch.compile."""

from __future__ import annotations

import pytest
import torch
from conftest import device_for, kernel_backends

import fastkd
from fastkd._options import DIVERGENCES, KernelArgs, LossOptions
from fastkd.backends import get_backend

BACKENDS = kernel_backends()


def op_args(device, *, divergence="jsd", labels=True, weights=True):
    g = torch.Generator().manual_seed(0)
    student = torch.randn(5, 300, generator=g).to(device)
    teacher = torch.randn(5, 280, generator=g).to(device)
    y = torch.randint(0, 300, (5,), generator=g)
    y[1] = -100
    w = torch.rand(5, generator=g)
    opts = LossOptions(divergence=divergence, vocab="pad", student_softcap=5.0)
    return (
        student,
        teacher,
        y.to(device) if labels else None,
        w.to(device) if weights else None,
        *opts.kernel_args(300, 280),
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["kl", "jsd"])
@pytest.mark.parametrize("optional", [True, False])
def test_opcheck(backend, divergence, optional):
    get_backend(backend).load()
    ops = get_backend(backend).ops
    args = op_args(device_for(backend), divergence=divergence, labels=optional, weights=optional)
    torch.library.opcheck(ops.fwd, args)
    loss, stats = ops.fwd(*args)
    student, teacher, labels, weights, *scalars = args
    grad = torch.empty_like(student)
    bwd_args = (student, teacher, labels, weights, stats, torch.rand_like(loss), *scalars, grad)
    torch.library.opcheck(ops.bwd, bwd_args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("in_place", [True, False])
def test_fwd_bwd_is_fwd_then_bwd(backend, divergence, in_place):
    """Backend.fwd_bwd (the CPU's fused op, the others' fwd then bwd) gives fwd's loss and
    stats and bwd's gradient, also written over the student itself."""
    args = op_args(device_for(backend), divergence=divergence)
    student, teacher, labels, weights, *scalars = args
    kernel_args = KernelArgs(*scalars)
    be = get_backend(backend)
    be.load()
    grad_loss = torch.rand(student.shape[0], device=student.device)
    loss, stats = be.fwd(student, teacher, labels, weights, kernel_args)
    grad = torch.empty_like(student)
    be.bwd(student, teacher, labels, weights, stats, grad_loss, kernel_args, grad)
    s = student.clone()
    out = s if in_place else torch.empty_like(s)
    fused_loss, fused_stats = be.fwd_bwd(s, teacher, labels, weights, grad_loss, kernel_args, out)
    torch.testing.assert_close(fused_loss, loss, rtol=0, atol=0)
    torch.testing.assert_close(fused_stats, stats, rtol=0, atol=0)
    torch.testing.assert_close(out, grad, rtol=0, atol=0)
    if not in_place:
        torch.testing.assert_close(s, student, rtol=0, atol=0)


@pytest.mark.skipif(not fastkd.backends()["cpu"].available, reason="C++ backend not built")
def test_opcheck_fwd_bwd():
    get_backend("cpu").load()
    student, teacher, labels, weights, *scalars = op_args("cpu")
    grad_loss = torch.rand(student.shape[0])
    args = (student, teacher, labels, weights, grad_loss, *scalars, torch.empty_like(student))
    torch.library.opcheck(torch.ops.fastkd.kd_loss_fwd_bwd, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile(backend):
    """kd_loss traces into one graph (custom ops with fake kernels) and matches eager."""
    device = device_for(backend)
    g = torch.Generator().manual_seed(1)
    student = torch.randn(6, 257, generator=g).to(device)
    teacher = torch.randn(6, 257, generator=g).to(device)
    labels = torch.randint(0, 257, (6,), generator=g).to(device)

    def step(s, t, y):
        return fastkd.kd_loss(s, t, y, temperature=2.0, divergence="reverse_kl", backend=backend)

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    s1 = student.clone().requires_grad_(True)
    s2 = student.clone().requires_grad_(True)
    eager = step(s1, teacher, labels)
    traced = compiled(s2, teacher, labels)
    eager.backward()
    traced.backward()
    torch.testing.assert_close(traced, eager)
    torch.testing.assert_close(s2.grad, s1.grad)
