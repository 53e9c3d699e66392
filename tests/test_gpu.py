"""What only a CUDA GPU runs (``fastkd check-gpu`` runs this file; it skips elsewhere): the
fused linear bf16 tensor-core GEMM path with fp32 output, real vocabularies in bf16, and
device placement across two GPUs (tensors on cuda:1 while cuda:0 is current, on a side
stream)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, kernel_backends
from test_fused_linear_kd_loss import STUDENT, make_problem, run_materialized
from test_kd_loss import check_backend, make_inputs

import fastkd

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
GPU_BACKENDS = [p for p in kernel_backends() if p.id != "cpu"]
TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_bf16_tensor_core_gemms_with_fp32_logits(backend):
    """bf16 hidden states and heads on CUDA: the GEMMs run in bf16 with fp32 output (no fp32
    copy of a head is made: the extra memory stays below one fp32 copy of the teacher's head),
    and loss and gradients match the fp64 truth on the same bf16 values."""
    n, hs, ht, v = 256, 1024, 4096, 32000
    p, labels = make_problem(n=n, hs=hs, ht=ht, v=v, bias=False, seed=21, scale=hs**-0.5)
    p = {k: None if x is None else x.bfloat16().double() for k, x in p.items()}  # bf16-exact
    on_gpu = {k: None if x is None else x.to("cuda", torch.bfloat16) for k, x in p.items()}
    h, w = (on_gpu[k].requires_grad_(True) for k in STUDENT[:2])
    y = labels.cuda()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = fastkd.fused_linear_kd_loss(
        h,
        w,
        y,
        teacher_hidden=on_gpu["teacher_hidden"],
        teacher_weight=on_gpu["teacher_weight"],
        temperature=1.0,
        backend=backend,
    )
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    fp32_teacher_head = v * ht * 4
    assert extra < fp32_teacher_head, f"{extra / 2**20:.0f} MiB: the heads were upcast"

    t_loss, t_grads = run_materialized(p, labels, temperature=1.0)
    assert loss.dtype == torch.float32 and h.grad.dtype == w.grad.dtype == torch.bfloat16
    for name, g, t in zip(STUDENT, (h.grad, w.grad), t_grads):
        rel = float((g.double().cpu() - t).norm() / t.norm())
        assert rel < 1e-2, f"grad {name}: relative error {rel:.4f}"
    assert abs(float(loss.detach()) - float(t_loss)) < 1e-2 * abs(float(t_loss))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("vocab", [50257, 128256, 256000])
@pytest.mark.parametrize("divergence", ["kl", "jsd"])
def test_real_vocabularies_in_bf16(backend, vocab, divergence):
    """GPT-2's, Llama 3's and Gemma's vocabularies (rows of many blocks, 50257 not a multiple
    of 16) in bf16 against the fp64 reference."""
    student, teacher, labels = make_inputs(6, vocab, seed=22)
    check_backend(
        backend, student, teacher, labels, dtype=torch.bfloat16, divergence=divergence, alpha=0.3
    )


def _kd_on(device: torch.device, backend: str, student, teacher, labels):
    s = student.to(device).requires_grad_(True)
    loss = fastkd.kd_loss(s, teacher.to(device), labels.to(device), backend=backend)
    loss.backward()
    return loss.detach(), s.grad


def _fused_on(device: torch.device, backend: str, p, labels):
    t = {k: None if x is None else x.to(device) for k, x in p.items()}
    h, w, b = (t[k].requires_grad_(True) for k in STUDENT)
    teacher = {k: t[k] for k in ("teacher_hidden", "teacher_weight", "teacher_bias")}
    loss = fastkd.fused_linear_kd_loss(
        h, w, labels.to(device), student_bias=b, **teacher, chunk_size=16, backend=backend
    )
    loss.backward()
    return loss.detach(), h.grad, w.grad, b.grad


@TWO_GPUS
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("op", ["kd_loss", "fused_linear_kd_loss"])
def test_tensors_on_the_second_gpu(backend, op):
    """Inputs on cuda:1 while cuda:0 is current: the kernels run on the tensors' device and
    its current stream, and give cuda:0's results."""
    if op == "kd_loss":
        inputs = make_inputs(9, 4099, seed=23)

        def compute(device):
            return _kd_on(device, backend, *inputs)
    else:
        p, labels = make_problem(seed=24)

        def compute(device):
            return _fused_on(device, backend, p, labels)

    with torch.cuda.device(0):
        expected = compute(torch.device("cuda:0"))
    # cuda:1's current stream is a side stream (the inputs are copied there) while cuda:0 is
    # the current device: a launch on the current device, or on cuda:1's default stream,
    # reads memory of the wrong device or races the copies.
    stream = torch.cuda.Stream(device=1)
    with torch.cuda.stream(stream), torch.cuda.device(0):
        got = compute(torch.device("cuda:1"))
        assert torch.cuda.current_device() == 0
    stream.synchronize()
    for e, g in zip(expected, got):
        assert g.device == torch.device("cuda:1")
        assert_close(g, e, atol=1e-6, rtol=1e-5, name=f"{op} on cuda:1")
