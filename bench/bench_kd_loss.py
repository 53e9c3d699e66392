"""Benchmark of ``fastkd.kd_loss`` on logits [BT, V] against eager PyTorch, ``torch.compile``
and Liger-Kernel's KL/JSD losses.

The floor is a copy of the same bytes: reading the student and teacher logits once and writing
one gradient-sized output (``torch.add(s, t, out=g)``), the least any fwd + bwd must move.
The same floor is used for every mode, and ``gbps`` is those bytes over the time."""

from __future__ import annotations

import functools

import torch

import fastkd
from fastkd.bench.eager import eager_kd_loss
from fastkd.bench.harness import Case, Runner, Unavailable, require_backend


def _inputs(case: Case):
    g = torch.Generator(device=case.device).manual_seed(0)
    shape = (case.bt, case.vocab)
    s = torch.randn(shape, generator=g, device=case.device, dtype=case.torch_dtype) * 2
    t = torch.randn(shape, generator=g, device=case.device, dtype=case.torch_dtype) * 2
    y = torch.randint(0, case.vocab, (case.bt,), generator=g, device=case.device)
    return s.requires_grad_(True), t, y


def _loss_runner(case: Case, loss_fn) -> Runner:
    s, t, y = _inputs(case)

    def forward():
        return loss_fn(s, t, y)

    def backward(loss):
        loss.backward()
        s.grad = None

    return Runner(forward, backward)


def _fastkd(case: Case, backend: str) -> Runner:
    require_backend(case, backend)
    kw = dict(temperature=case.temperature, alpha=case.alpha, divergence=case.divergence)
    return _loss_runner(case, lambda s, t, y: fastkd.kd_loss(s, t, y, backend=backend, **kw))


def _eager(case: Case, compiled: bool = False) -> Runner:
    fn = functools.partial(
        eager_kd_loss, temperature=case.temperature, alpha=case.alpha, divergence=case.divergence
    )
    if compiled:
        fn = torch.compile(fn)
    return _loss_runner(case, fn)


def _liger(case: Case) -> Runner:
    if case.device != "cuda":
        raise Unavailable("Liger-Kernel runs on CUDA only")
    if case.alpha != 0.0 or case.divergence not in ("kl", "jsd"):
        raise Unavailable("Liger's KL/JSD losses have no CE term: compare with alpha=0, kl or jsd")
    try:
        from liger_kernel.transformers import LigerJSD, LigerKLDIVLoss
    except ImportError as exc:
        raise Unavailable(f"liger-kernel is not installed ({exc})") from exc
    temp = case.temperature
    if case.divergence == "kl":
        loss = LigerKLDIVLoss(reduction="batchmean", log_target=True)

        def fn(s, t, y):
            lq = torch.log_softmax(s.float() / temp, -1)
            lp = torch.log_softmax(t.float() / temp, -1)
            return temp * temp * loss(lq, lp)
    else:
        jsd = LigerJSD(beta=0.5)

        def fn(s, t, y):
            return (
                temp * temp * jsd(torch.log_softmax(s / temp, -1), torch.log_softmax(t / temp, -1))
            )

    return _loss_runner(case, fn)


def _floor(case: Case) -> Runner:
    s, t, _ = _inputs(case)
    out = torch.empty_like(s)

    def copy():
        torch.add(s.detach(), t, out=out)

    return Runner(copy, lambda _: copy(), full=copy)


def contenders(case: Case) -> dict:
    found = {"floor": lambda: _floor(case)}
    for backend in ("cuda", "triton", "cpu", "reference"):
        found[f"fastkd-{backend}"] = functools.partial(_fastkd, case, backend)
    found["eager"] = lambda: _eager(case)
    found["compile"] = lambda: _eager(case, compiled=True)
    found["liger"] = lambda: _liger(case)
    return found


def work(case: Case, mode: str) -> tuple[float, float]:
    """(FLOPs, bytes) of the floor: read student and teacher logits, write one gradient."""
    element = torch.finfo(case.torch_dtype).bits // 8
    return 0.0, 3.0 * case.bt * case.vocab * element


CPU_SHAPES = [(4096, 32000), (1024, 32000)]
GPU_SHAPES = [(bt, v) for v in (32000, 128256, 151936, 256000) for bt in (1024, 4096, 8192, 16384)]
