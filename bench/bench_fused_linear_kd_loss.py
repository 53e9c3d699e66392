"""Benchmark of ``fastkd.fused_linear_kd_loss`` (hidden states + lm_head weights in) against
eager PyTorch (materialized logits + the loss), ``torch.compile`` of the same, Liger-Kernel's
chunked distillation loss (``LigerFusedLinearJSDLoss``: torch.compile, any device) and fused
linear JSD (Triton, CUDA), and, for the CE-only case (alpha=1), Cut Cross-Entropy's
``linear_cross_entropy`` (``impl="cce"`` on CUDA, ``impl="torch_compile"`` on any device) and
Liger's fused linear CE (CUDA).

Peers compute fastkd's loss exactly (docs/design.md §1): Liger leaves out the T^2, so its soft
weight is ``(1 - alpha) * T^2`` and its hard weight ``alpha``; Liger's JSD beta weighs the
teacher in the mixture as fastkd's does, so kl is beta=0 and reverse_kl beta=1.

The floor is the bare GEMMs in the input dtype: the student's and the teacher's logits (fwd),
the student's grad_hidden and grad_weight (bwd): 2·N·V·Ht + 6·N·V·Hs FLOPs. CE only (alpha=1)
needs no teacher logits, and neither fastkd nor the floor computes them.

Only fwd + bwd (``full``) is timed: fastkd (for the scalar reductions) and Liger finish the
gradients in the forward, so a forward or a backward alone compares nothing."""

from __future__ import annotations

import functools

import torch

import fastkd
from fastkd.bench.eager import eager_kd_loss
from fastkd.bench.harness import Case, Runner, Unavailable, require_backend, require_memory

# Peak memory of the eager loss (and of torch.compile's) in units of one [N, V] fp32 tensor,
# measured at 4096 x 32000 on the CPU with JSD (6500 and 4500 MiB for 500 MiB).
EAGER_PEAK = {"eager": 13.0, "compile": 9.0}


@functools.lru_cache(maxsize=1)
def _inputs(case: Case):
    """The case's inputs, shared by its contenders (each clears the gradients it makes)."""
    g = torch.Generator(device=case.device).manual_seed(0)

    def randn(*shape, scale=1.0):
        x = torch.randn(shape, generator=g, device=case.device, dtype=torch.float32) * scale
        return x.to(case.torch_dtype)

    h = randn(case.bt, case.hidden).requires_grad_(True)
    w = randn(case.vocab, case.hidden, scale=case.hidden**-0.5).requires_grad_(True)
    ht = randn(case.bt, case.teacher_hidden)
    wt = randn(case.vocab, case.teacher_hidden, scale=case.teacher_hidden**-0.5)
    y = torch.randint(0, case.vocab, (case.bt,), generator=g, device=case.device)
    return h, w, ht, wt, y


def _runner(case: Case, loss_fn) -> Runner:
    h, w, ht, wt, y = _inputs(case)

    def backward(loss):
        loss.backward()
        h.grad = w.grad = None

    return Runner(lambda: loss_fn(h, w, ht, wt, y), backward)


def _fastkd(case: Case, backend: str) -> Runner:
    require_backend(case, backend)
    kw = dict(
        temperature=case.temperature,
        alpha=case.alpha,
        divergence=case.divergence,
        beta=case.beta,
        backend=backend,
    )

    def loss(h, w, ht, wt, y):
        teacher = {} if case.alpha == 1 else dict(teacher_hidden=ht, teacher_weight=wt)
        return fastkd.fused_linear_kd_loss(h, w, y, **teacher, **kw)

    return _runner(case, loss)


def _eager_loss(case: Case, h, w, ht, wt, y):
    zt = None
    if case.alpha != 1:
        with torch.no_grad():
            zt = ht @ wt.t()
    return eager_kd_loss(
        h @ w.t(),
        zt,
        y,
        temperature=case.temperature,
        alpha=case.alpha,
        divergence=case.divergence,
        beta=case.beta,
    )


def _eager(case: Case, compiled: bool = False) -> Runner:
    name = "compile" if compiled else "eager"
    if case.alpha != 1 and case.divergence not in HAND_WRITTEN:
        raise Unavailable(f"eager and compile are timed on {', '.join(HAND_WRITTEN)} only")
    require_memory(case, EAGER_PEAK[name] * case.bt * case.vocab * 4, name)
    fn = functools.partial(_eager_loss, case)
    return _runner(case, torch.compile(fn) if compiled else fn)


def _liger_beta(case: Case) -> float:
    """Liger's JSD beta for the case's divergence (Liger's JSD is fastkd's at beta, its
    beta=0 the forward KL, beta=1 the reverse KL)."""
    if case.alpha == 1:
        raise Unavailable("Liger's distillation losses always compute the teacher's logits")
    betas = {"kl": 0.0, "reverse_kl": 1.0, "jsd": case.beta}
    if case.divergence not in betas:
        raise Unavailable(f"Liger's fused linear losses have no {case.divergence}")
    return betas[case.divergence]


def _liger_chunked(case: Case) -> Runner:
    """``LigerFusedLinearJSDLoss``: chunks of 1024 rows, each compiled (torch.compile);
    runs on the CPU too."""
    beta = _liger_beta(case)
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    except ImportError as exc:
        raise Unavailable(f"liger-kernel is not installed ({exc})") from exc
    t = case.temperature
    loss = LigerFusedLinearJSDLoss(
        weight_hard_loss=case.alpha,
        weight_soft_loss=(1 - case.alpha) * t * t,
        beta=beta,
        temperature=t,
    )
    return _runner(case, loss)


def _liger_fused(case: Case) -> Runner:
    """``LigerFusedLinearJSD`` (Triton): the distillation term alone, times T^2."""
    beta = _liger_beta(case)
    if case.device != "cuda":
        raise Unavailable("LigerFusedLinearJSD is Triton: CUDA only")
    if case.alpha:
        raise Unavailable("LigerFusedLinearJSD has no CE term: compare with alpha=0")
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD
    except ImportError as exc:
        raise Unavailable(f"liger-kernel is not installed ({exc})") from exc
    t = case.temperature
    loss = LigerFusedLinearJSD(jsd_beta=beta, temperature=t)
    return _runner(case, lambda h, w, ht, wt, y: t * t * loss(h, w, ht, wt, y))


def _liger_ce(case: Case) -> Runner:
    """``LigerFusedLinearCrossEntropyLoss`` (Triton), the CE-only case."""
    if case.alpha != 1:
        raise Unavailable("Liger's fused linear CE computes the CE alone: compare with alpha=1")
    if case.device != "cuda":
        raise Unavailable("LigerFusedLinearCrossEntropyLoss is Triton: CUDA only")
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError as exc:
        raise Unavailable(f"liger-kernel is not installed ({exc})") from exc
    loss = LigerFusedLinearCrossEntropyLoss()
    return _runner(case, lambda h, w, ht, wt, y: loss(w, h, y))


def _cce(case: Case, impl: str) -> Runner:
    """Cut Cross-Entropy, the CE-only case: its Triton kernels (``cce``, CUDA) or its
    ``torch_compile`` implementation (any device)."""
    if case.alpha != 1:
        raise Unavailable("Cut Cross-Entropy computes the CE alone: compare with alpha=1")
    if impl == "cce" and case.device != "cuda":
        raise Unavailable("Cut Cross-Entropy's kernels run on CUDA only")
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError as exc:
        raise Unavailable(f"cut-cross-entropy is not installed ({exc})") from exc
    return _runner(case, lambda h, w, ht, wt, y: linear_cross_entropy(h, w, y, impl=impl))


def _floor(case: Case) -> Runner:
    h, w, ht, wt, _ = _inputs(case)
    h, w = h.detach(), w.detach()
    g = torch.randn(case.bt, case.vocab, device=case.device, dtype=case.torch_dtype)

    def forward():
        h @ w.t()
        if case.alpha != 1:
            ht @ wt.t()

    def backward(_):
        g @ w
        g.t() @ h

    def full():
        forward()
        backward(None)

    return Runner(forward, backward, full=full)


def contenders(case: Case) -> dict:
    found = {"floor": lambda: _floor(case)}
    for backend in ("triton", "cuda", "cpu", "reference"):
        found[f"fastkd-{backend}"] = functools.partial(_fastkd, case, backend)
    found["eager"] = lambda: _eager(case)
    found["compile"] = lambda: _eager(case, compiled=True)
    found["liger-chunked-jsd"] = lambda: _liger_chunked(case)
    found["liger-fused-linear-jsd"] = lambda: _liger_fused(case)
    found["liger-fused-linear-ce"] = lambda: _liger_ce(case)
    found["cut-cross-entropy"] = lambda: _cce(case, "cce")
    found["cut-cross-entropy-compile"] = lambda: _cce(case, "torch_compile")
    return found


def work(case: Case, mode: str) -> tuple[float, float]:
    """(FLOPs, bytes) of the floor's GEMMs."""
    nv = case.bt * case.vocab
    teacher = 2.0 * nv * case.teacher_hidden if case.alpha != 1 else 0.0
    flops = {
        "fwd": teacher + 2.0 * nv * case.hidden,
        "bwd": 4.0 * nv * case.hidden,
        "full": teacher + 6.0 * nv * case.hidden,
    }[mode]
    return flops, 0.0


MODES = ("full",)
# Contenders that call torch.compile (minutes of compiling on the CPU: --quick skips them).
COMPILED = ("compile", "liger-chunked-jsd", "cut-cross-entropy-compile")
OURS = {"cpu": "fastkd-cpu", "cuda": "fastkd-triton"}  # ratio_to_fastkd divides by this
HAND_WRITTEN = ("kl", "jsd")  # divergences eager and compile are timed on (and CE only)
# The cases of `fastkd bench` (Case fields beyond op, dtype and device). Liger's fused linear
# losses are JSD (kl and reverse_kl at beta 0 and 1): jsd is the case at every shape; CE only
# (alpha=1) is Cut Cross-Entropy's case.
QUICK_CASES = [
    dict(bt=512, vocab=8192, hidden=64, teacher_hidden=64, divergence="jsd"),
    dict(bt=512, vocab=8192, hidden=64, teacher_hidden=64, alpha=1.0),
]
_CPU_WIDTHS = dict(hidden=256, teacher_hidden=512)
CPU_CASES = [
    *(
        dict(bt=4096, vocab=32000, divergence=d, **_CPU_WIDTHS)
        for d in ("jsd", "kl", "reverse_kl", "tvd", "skew_kl", "skew_reverse_kl")
    ),
    dict(bt=4096, vocab=32000, alpha=1.0, **_CPU_WIDTHS),
    dict(bt=16384, vocab=32000, divergence="jsd", **_CPU_WIDTHS),
    dict(bt=1024, vocab=128256, divergence="jsd", **_CPU_WIDTHS),
]
# Llama 3, Qwen 2 and Gemma vocabularies; a 2048-wide student of a 4096-wide teacher.
_GPU_WIDTHS = dict(hidden=2048, teacher_hidden=4096, divergence="jsd")
GPU_CASES = [dict(bt=8192, vocab=v, **_GPU_WIDTHS) for v in (128256, 151936, 256000)] + [
    dict(bt=4096, vocab=128256, **_GPU_WIDTHS),
    dict(bt=8192, vocab=128256, **_GPU_WIDTHS, alpha=1.0),
]
