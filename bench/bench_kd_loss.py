"""Benchmark of ``fastkd.kd_loss`` on logits [BT, V] against eager PyTorch, ``torch.compile``
and Liger-Kernel's KL/JSD and CE losses (CUDA only: they are Triton kernels).

The floor, the same for every mode, is what bounds the loss on the device:

- CPU: arithmetic. The exponentials the loss cannot do without (``exps_per_element``: e^a and
  e^b for the two softmaxes, the log of the mixture for jsd and the skew divergences, e^c for
  the CE unless it is a power of e^a) times N·V, timed as ``torch.exp`` (ATen's vectorised
  exp, all threads) over an 8 MiB fp32 buffer (in L3; a buffer small enough for L2 makes
  every call so short that starting the threads costs more than L3 does), repeated until it
  has computed that many. Its row records the count (``exps``) and the throughput it measured
  (``gexp_per_s``). ``copy`` (below) is timed beside it as the memory reference.
- CUDA: memory (a GPU computes exponentials far faster than it moves bytes): ``copy``.

``copy`` moves the bytes any fwd + bwd must move, reading the student and teacher logits once
and writing one gradient-sized output (``torch.add(s, t, out=g)``); ``gbps`` is those bytes
over the time."""

from __future__ import annotations

import functools

import torch

import fastkd
from fastkd.bench.eager import eager_kd_loss
from fastkd.bench.harness import Case, Runner, Unavailable, require_backend, require_memory


@functools.lru_cache(maxsize=1)
def _inputs(case: Case):
    """The case's inputs, shared by its contenders (each clears the gradients it makes)."""
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
    kw = dict(
        temperature=case.temperature, alpha=case.alpha, divergence=case.divergence, beta=case.beta
    )
    return _loss_runner(case, lambda s, t, y: fastkd.kd_loss(s, t, y, backend=backend, **kw))


# Peak memory of the eager loss (and of torch.compile's) in units of one [BT, V] fp32 tensor,
# measured at 4096 x 32000 on the CPU (2500 and 1000 MiB for 500 MiB).
EAGER_PEAK = {"eager": 5.0, "compile": 2.0}


def _eager(case: Case, compiled: bool = False) -> Runner:
    name = "compile" if compiled else "eager"
    require_memory(case, EAGER_PEAK[name] * case.bt * case.vocab * 4, name)
    fn = functools.partial(
        eager_kd_loss,
        temperature=case.temperature,
        alpha=case.alpha,
        divergence=case.divergence,
        beta=case.beta,
    )
    if compiled:
        fn = torch.compile(fn)
    return _loss_runner(case, fn)


def _liger(case: Case) -> Runner:
    """Liger-Kernel's Triton losses as a Liger user composes them: fp32 log-softmaxes at T by
    torch, Liger's KL (or its generalized JSD, same beta convention as fastkd: beta=1 is the
    reverse KL) times T^2, which Liger leaves out, plus alpha times Liger's CE at T=1."""
    if case.device != "cuda":
        raise Unavailable("Liger-Kernel's KL, JSD and CE kernels run on CUDA only")
    if case.divergence not in ("kl", "reverse_kl", "jsd"):
        raise Unavailable(f"Liger-Kernel has no {case.divergence} loss")
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss, LigerJSD, LigerKLDIVLoss
    except ImportError as exc:
        raise Unavailable(f"liger-kernel is not installed ({exc})") from exc
    temp, alpha = case.temperature, case.alpha
    if case.divergence == "kl":
        divergence = LigerKLDIVLoss(reduction="batchmean", log_target=True)
    else:
        divergence = LigerJSD(beta=1.0 if case.divergence == "reverse_kl" else case.beta)
    ce = LigerCrossEntropyLoss()

    def fn(s, t, y):
        lq = torch.log_softmax(s.float() / temp, -1)
        lp = torch.log_softmax(t.float() / temp, -1)
        loss = (1 - alpha) * temp * temp * divergence(lq, lp)
        # Liger's CE overwrites its input with the gradient: give it a copy of the logits.
        return loss + alpha * ce(s.clone(), y) if alpha else loss

    runner = _loss_runner(case, fn)
    if alpha:
        runner.notes["note"] = "CE on a copy of the logits (Liger's CE overwrites its input)"
    return runner


def exps_per_element(case: Case) -> int:
    """Transcendentals per logit that any implementation of the loss computes: e^a and e^b
    (the two softmaxes), the log of the mixture m for the mixture divergences, and e^c for the
    CE, which at T = 1 or 2 is a power of e^a when the KD term is on."""
    kd = case.alpha != 1
    n = 0
    if kd:
        n = 2 + (case.divergence in ("jsd", "skew_kl", "skew_reverse_kl"))
    if case.alpha and not (kd and case.temperature in (1.0, 2.0)):
        n += 1
    return n


EXP_BUFFER = 1 << 21  # fp32 elements: 8 MiB in, 8 MiB out, in L3


def _exp_floor(case: Case) -> Runner:
    exps = exps_per_element(case) * case.bt * case.vocab
    x = torch.rand(EXP_BUFFER, device=case.device) - 0.5
    out = torch.empty_like(x)
    reps = max(1, round(exps / EXP_BUFFER))

    def run():
        for _ in range(reps):
            torch.exp(x, out=out)

    notes = {"exps": reps * EXP_BUFFER, "exps_per_element": exps_per_element(case)}
    return Runner(run, lambda _: run(), full=run, notes=notes)


def _copy(case: Case) -> Runner:
    s, t, _ = _inputs(case)
    out = torch.empty_like(s)

    def copy():
        torch.add(s.detach(), t, out=out)

    return Runner(copy, lambda _: copy(), full=copy)


def contenders(case: Case) -> dict:
    if case.device == "cuda":
        found = {"floor": lambda: _copy(case)}
    else:
        found = {"floor": lambda: _exp_floor(case), "copy": lambda: _copy(case)}
    for backend in ("cuda", "triton", "cpu", "reference"):
        found[f"fastkd-{backend}"] = functools.partial(_fastkd, case, backend)
    found["eager"] = lambda: _eager(case)
    found["compile"] = lambda: _eager(case, compiled=True)
    found["liger"] = lambda: _liger(case)
    return found


def work(case: Case, mode: str) -> tuple[float, float]:
    """(FLOPs, bytes): no FLOPs counted; the bytes of ``copy``: read student and teacher
    logits, write one gradient."""
    element = torch.finfo(case.torch_dtype).bits // 8
    return 0.0, 3.0 * case.bt * case.vocab * element


COMPILED = ("compile",)  # contenders that call torch.compile (--quick skips them)
OURS = {"cpu": "fastkd-cpu", "cuda": "fastkd-triton"}  # ratio_to_fastkd divides by this
# The cases of `fastkd bench` (Case fields beyond op, dtype and device).
QUICK_CASES = [dict(bt=256, vocab=8192)]
CPU_CASES = [
    dict(bt=4096, vocab=32000, divergence="kl"),
    dict(bt=4096, vocab=32000, divergence="jsd"),
    dict(bt=1024, vocab=32000, divergence="kl"),
]
# Llama 3, Qwen 2 and Gemma vocabularies; BT = batch x sequence of a training step.
GPU_CASES = [dict(bt=bt, vocab=v) for v in (128256, 151936, 256000) for bt in (4096, 8192)]
