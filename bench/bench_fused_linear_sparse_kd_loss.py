"""Benchmark of ``fastkd.fused_linear_sparse_kd_loss`` (student hidden states + lm_head and a
cached top-k teacher in) against the same loss written by hand (materialized student logits,
log-softmax, gather: what DistillKit and Axolotl do), against the online teacher
(``fastkd.fused_linear_kd_loss`` with the teacher's hidden states and head, the dense loss a
cache replaces), and against the floor.

The floor is the student's bare GEMMs in the input dtype, which every implementation needs:
its logits (fwd), grad_hidden and grad_weight (bwd): 6·N·V·Hs FLOPs. The online teacher adds
its head's GEMM (2·N·V·Ht) and a dense row kernel; a cached teacher adds a gather of k columns.
Only fwd + bwd (``full``) is timed, as for the dense fused loss (the gradients are finished in
the forward)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

import fastkd
from fastkd.bench.harness import Case, Runner, Unavailable, require_backend, require_memory
from fastkd.reference import TAIL_FLOOR

# Peak memory of the hand-written loss in units of one [N, V] fp32 tensor (logits, their
# log-softmax, and the gradients of both), for the memory check before running it.
EAGER_PEAK = 6.0


@functools.lru_cache(maxsize=1)
def _inputs(case: Case):
    """The case's inputs: the student, its teacher's hidden states and head, and that
    teacher's cached top-k at the case's temperature."""
    g = torch.Generator(device=case.device).manual_seed(0)

    def randn(*shape, scale=1.0):
        x = torch.randn(shape, generator=g, device=case.device, dtype=torch.float32) * scale
        return x.to(case.torch_dtype)

    h = randn(case.bt, case.hidden).requires_grad_(True)
    w = randn(case.vocab, case.hidden, scale=case.hidden**-0.5).requires_grad_(True)
    ht = randn(case.bt, case.teacher_hidden)
    wt = randn(case.vocab, case.teacher_hidden, scale=4 * case.teacher_hidden**-0.5)
    ids = torch.empty(case.bt, case.top_k, dtype=torch.int64, device=case.device)
    logprobs = torch.empty(case.bt, case.top_k, dtype=torch.float32, device=case.device)
    for rows in range(0, case.bt, 512):  # the teacher's [N, V] logits a chunk at a time
        z = (ht[rows : rows + 512] @ wt.t()).float() / case.temperature
        top = torch.log_softmax(z, -1).topk(case.top_k, -1)
        ids[rows : rows + 512], logprobs[rows : rows + 512] = top.indices, top.values
    y = torch.randint(0, case.vocab, (case.bt,), generator=g, device=case.device)
    return h, w, ht, wt, ids, logprobs, y


def _runner(case: Case, loss_fn) -> Runner:
    h, w, ht, wt, ids, logprobs, y = _inputs(case)

    def backward(loss):
        loss.backward()
        h.grad = w.grad = None

    return Runner(lambda: loss_fn(h, w, ht, wt, ids, logprobs, y), backward)


def _options(case: Case) -> dict:
    return dict(temperature=case.temperature, alpha=case.alpha, divergence=case.divergence)


def _fastkd(case: Case, backend: str) -> Runner:
    require_backend(case, backend)
    kw = dict(**_options(case), tail=case.tail, backend=backend)

    def loss(h, w, ht, wt, ids, logprobs, y):
        return fastkd.fused_linear_sparse_kd_loss(h, w, ids, logprobs, y, **kw)

    return _runner(case, loss)


def _online(case: Case, backend: str) -> Runner:
    """The dense fused loss against the teacher's hidden states and head: what the cache
    replaces (at the loss; the teacher's body is not timed)."""
    require_backend(case, backend)
    kw = dict(**_options(case), backend=backend)

    def loss(h, w, ht, wt, ids, logprobs, y):
        return fastkd.fused_linear_kd_loss(h, w, y, teacher_hidden=ht, teacher_weight=wt, **kw)

    return _runner(case, loss)


def eager_sparse_kd_loss(logits, ids, logprobs, labels, *, temperature, alpha, tail):
    """Forward KL against a cached top-k, as written by hand: the student's whole log-softmax
    materialized, then gathered at the cached ids; mean over tokens."""
    t = temperature
    lq_all = F.log_softmax(logits.float() / t, -1)
    lq = lq_all.gather(1, ids)
    p = logprobs.exp()
    if tail == "bucket":
        p_tail = (1 - p.sum(1)).clamp_min(TAIL_FLOOR)
        q_tail = (-torch.expm1(torch.logsumexp(lq, 1))).clamp_min(TAIL_FLOOR)
        d = (p * (logprobs - lq)).sum(1) + p_tail * (p_tail.log() - q_tail.log())
    else:
        p = p / p.sum(1, keepdim=True)
        if tail == "renormalize":
            lq = lq - torch.logsumexp(lq, 1, keepdim=True)
        d = (p * (p.log() - lq)).sum(1)
    kd = (1 - alpha) * t * t * d.mean()
    return kd + alpha * F.cross_entropy(logits.float(), labels) if alpha else kd


def _eager(case: Case) -> Runner:
    if case.divergence != "kl":
        raise Unavailable("the hand-written sparse loss is timed for kl only")
    require_memory(case, EAGER_PEAK * case.bt * case.vocab * 4, "eager")
    kw = dict(temperature=case.temperature, alpha=case.alpha, tail=case.tail)

    def loss(h, w, ht, wt, ids, logprobs, y):
        return eager_sparse_kd_loss(h @ w.t(), ids, logprobs, y, **kw)

    return _runner(case, loss)


def _floor(case: Case) -> Runner:
    h, w = (t.detach() for t in _inputs(case)[:2])
    g = torch.randn(case.bt, case.vocab, device=case.device, dtype=case.torch_dtype)

    def forward():
        h @ w.t()

    def backward(_):
        g @ w
        g.t() @ h

    def full():
        forward()
        backward(None)

    return Runner(forward, backward, full=full)


def contenders(case: Case) -> dict:
    found = {"floor": lambda: _floor(case)}
    for backend in ("triton", "cpu", "reference"):
        found[f"fastkd-{backend}"] = functools.partial(_fastkd, case, backend)
    for backend in ("triton", "cpu"):
        found[f"online-teacher-{backend}"] = functools.partial(_online, case, backend)
    found["eager"] = lambda: _eager(case)
    return found


def work(case: Case, mode: str) -> tuple[float, float]:
    """(FLOPs, bytes) of the floor's GEMMs."""
    nv = case.bt * case.vocab * case.hidden
    return {"fwd": 2.0 * nv, "bwd": 4.0 * nv, "full": 6.0 * nv}[mode], 0.0


MODES = ("full",)
OURS = {"cpu": "fastkd-cpu", "cuda": "fastkd-triton"}  # ratio_to_fastkd divides by this
_CASE = dict(divergence="kl", alpha=0.1, temperature=1.0, tail="bucket")
QUICK_CASES = [dict(bt=512, vocab=8192, hidden=64, teacher_hidden=64, top_k=16, **_CASE)]
_CPU_WIDTHS = dict(hidden=256, teacher_hidden=512)
CPU_CASES = [
    *(dict(bt=4096, vocab=32000, top_k=k, **_CPU_WIDTHS, **_CASE) for k in (8, 64)),
    dict(bt=4096, vocab=32000, top_k=64, **_CPU_WIDTHS, **{**_CASE, "tail": "ignore"}),
    dict(bt=4096, vocab=32000, top_k=64, **_CPU_WIDTHS, **{**_CASE, "divergence": "jsd"}),
    dict(bt=1024, vocab=128256, top_k=64, **_CPU_WIDTHS, **_CASE),
]
_GPU_WIDTHS = dict(hidden=2048, teacher_hidden=4096)
GPU_CASES = [
    dict(bt=8192, vocab=v, top_k=64, **_GPU_WIDTHS, **_CASE) for v in (128256, 151936, 256000)
]
