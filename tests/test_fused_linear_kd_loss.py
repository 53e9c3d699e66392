"""fused_linear_kd_loss / FusedLinearKDLoss against kd_loss on materialized fp64 logits."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, device_for, kernel_backends, tolerance

import fastkd
from fastkd.backends import get_backend
from fastkd.memory import peak_memory_bytes

BACKENDS = [pytest.param("reference", id="reference"), *kernel_backends()]
DIVERGENCES = ["kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl"]
STUDENT = ("student_hidden", "student_weight", "student_bias")
TEACHER = ("teacher_hidden", "teacher_weight", "teacher_bias")


def make_problem(n=37, hs=16, ht=24, v=1031, vt=None, *, bias=True, seed=0, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    p = {
        "student_hidden": torch.randn(n, hs, generator=g),
        "student_weight": torch.randn(v, hs, generator=g) * scale,
        "student_bias": torch.randn(v, generator=g) * 0.1 if bias else None,
        "teacher_hidden": torch.randn(n, ht, generator=g),
        "teacher_weight": torch.randn(vt or v, ht, generator=g) * scale,
        "teacher_bias": torch.randn(vt or v, generator=g) * 0.1 if bias else None,
    }
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.2] = -100
    return p, labels


def _logits(hidden, weight, bias):
    z = hidden @ weight.t()
    return z if bias is None else z + bias


def run_fused(p, labels, *, backend, dtype=None, teacher_as_logits=False, grad_out=None, **kw):
    """Loss and [grad hidden, grad weight, grad bias] of fused_linear_kd_loss on the backend's
    device, returned on the CPU."""
    device = device_for(backend)
    t = {
        k: None if v is None else v.to(device=device, dtype=dtype or v.dtype, copy=True)
        for k, v in p.items()
    }
    student = [None if t[k] is None else t[k].requires_grad_(True) for k in STUDENT]
    teacher = {k: t[k] for k in TEACHER}
    if teacher_as_logits:
        teacher = {"teacher_logits": _logits(*teacher.values())}
    loss = fastkd.fused_linear_kd_loss(
        student[0],
        student[1],
        None if labels is None else labels.to(device),
        student_bias=student[2],
        backend=backend,
        **teacher,
        **kw,
    )
    loss.backward(torch.ones_like(loss) if grad_out is None else grad_out.to(loss))
    return loss.detach().cpu(), [None if s is None else s.grad.cpu() for s in student]


def run_materialized(
    p, labels, *, grad_out=None, shift_labels=False, chunk_size=None, memory_budget=None, **kw
):
    """The same loss through kd_loss on fp64 logits (the truth)."""
    student = [
        None if p[k] is None else p[k].to(torch.float64, copy=True).requires_grad_(True)
        for k in STUDENT
    ]
    teacher = [None if p[k] is None else p[k].double() for k in TEACHER]
    if shift_labels:
        labels = torch.cat([labels[1:], labels.new_full((1,), -100)])
    loss = fastkd.kd_loss(_logits(*student), _logits(*teacher), labels, backend="reference", **kw)
    loss.backward(torch.ones_like(loss) if grad_out is None else grad_out.double())
    return loss.detach(), [None if s is None else s.grad for s in student]


def fused_tolerance(backend, p, *, dtype=torch.float32, **kw):
    """The row kernel's tolerance, plus the rounding of the fp32 GEMMs that feed it."""
    tol = tolerance(backend, dtype, p["student_weight"].shape[0], **kw)
    return {k: v + 1e-5 for k, v in tol.items()}


def check(backend, p, labels, *, dtype=torch.float32, **kw):
    loss, grads = run_fused(p, labels, dtype=dtype, backend=backend, **kw)
    kw.pop("teacher_as_logits", None)
    t_loss, t_grads = run_materialized(p, labels, **kw)
    tol = fused_tolerance(backend, p, dtype=dtype, **kw)
    assert_close(loss, t_loss, name="loss", **tol)
    for name, g, t in zip(STUDENT, grads, t_grads):
        if t is not None:
            assert_close(g, t, name=f"grad {name}", **tol)
    return loss, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("teacher_as_logits", [False, True], ids=["teacher-head", "teacher-logits"])
def test_matches_materialized(backend, divergence, teacher_as_logits):
    p, labels = make_problem(seed=DIVERGENCES.index(divergence))
    check(
        backend,
        p,
        labels,
        divergence=divergence,
        teacher_as_logits=teacher_as_logits,
        chunk_size=8,
        alpha=0.3,
        temperature=1.5,
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("teacher_as_logits", [False, True], ids=["teacher-head", "teacher-logits"])
def test_ce_only_does_not_read_the_teacher(backend, teacher_as_logits):
    """alpha=1 is the fused linear CE: a NaN teacher changes nothing (its logits are skipped)."""
    p, labels = make_problem(seed=3)
    ce = run_materialized(p, labels, alpha=1.0)
    p.update({k: torch.full_like(p[k], float("nan")) for k in TEACHER})
    loss, grads = run_fused(
        p, labels, backend=backend, alpha=1.0, teacher_as_logits=teacher_as_logits
    )
    tol = fused_tolerance(backend, p, alpha=1.0)
    assert_close(loss, ce[0], name="loss", **tol)
    for name, g, t in zip(STUDENT, grads, ce[1]):
        assert_close(g, t, name=f"grad {name}", **tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weights", [{"alpha": 1.0}, {"ce_weight": 0.7}], ids=["alpha1", "kd0"])
def test_ce_only_needs_no_teacher(backend, weights):
    """CE alone (alpha=1, or kd_weight=0) takes no teacher at all: the fused linear CE."""
    p, labels = make_problem(seed=4)
    truth_loss, truth_grads = run_materialized(p, labels, **weights)
    p.update(dict.fromkeys(TEACHER))
    loss, grads = run_fused(p, labels, backend=backend, chunk_size=8, **weights)
    tol = fused_tolerance(backend, p, **weights)
    assert_close(loss, truth_loss, name="loss", **tol)
    for name, g, t in zip(STUDENT, grads, truth_grads):
        assert_close(g, t, name=f"grad {name}", **tol)
    module = fastkd.FusedLinearKDLoss(backend=backend, chunk_size=8, **weights)
    h, w, b, y = (t.to(device_for(backend)) for t in (*(p[k] for k in STUDENT), labels))
    assert torch.equal(module(h, w, y, student_bias=b).detach().cpu(), loss)


def test_ce_only_chunks_reserve_no_teacher_columns(monkeypatch):
    """A memory budget of two rows of student logits: chunks of 2 rows for CE alone (teacher
    given or not), of 1 row when the teacher's logits share the budget."""
    p, labels = make_problem(n=12, seed=5)
    reference = get_backend("reference")
    rows, fwd = [], reference.fwd
    monkeypatch.setattr(reference, "fwd", lambda zs, *a: rows.append(len(zs)) or fwd(zs, *a))
    budget = 2 * 4 * p["student_weight"].shape[0]
    for teacher, alpha, expected in [(True, 1.0, 2), (False, 1.0, 2), (True, 0.5, 1)]:
        q = p if teacher else {**p, **dict.fromkeys(TEACHER)}
        rows.clear()
        run_fused(q, labels, backend="reference", memory_budget=budget, alpha=alpha)
        assert rows == [expected] * (12 // expected), (teacher, alpha)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none", "batchmean"])
def test_reductions_and_grad_output(backend, reduction):
    p, labels = make_problem(n=29, seed=7)
    grad_out = torch.randn(29) if reduction == "none" else torch.tensor(0.7)
    check(backend, p, labels, reduction=reduction, grad_out=grad_out, chunk_size=10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_size", [1, 5, 37, 1000])
def test_chunk_sizes(backend, chunk_size):
    p, labels = make_problem(bias=False, seed=8)
    check(backend, p, labels, chunk_size=chunk_size, divergence="tvd")


@pytest.mark.parametrize("backend", BACKENDS)
def test_memory_budget_picks_chunks(backend):
    p, labels = make_problem(seed=9)
    # 2 rows of fp32 student + teacher logits per chunk.
    check(backend, p, labels, memory_budget=2 * 8 * 1031, divergence="jsd")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["truncate", "pad"])
def test_vocab_mismatch(backend, mode):
    p, labels = make_problem(v=1031, vt=1000, seed=10)
    check(backend, p, labels, vocab=mode, chunk_size=16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logit_scale_and_softcap(backend):
    p, labels = make_problem(seed=11, scale=3.0)
    check(
        backend,
        p,
        labels,
        chunk_size=16,
        student_logit_scale=0.0625,
        student_softcap=30.0,
        teacher_softcap=20.0,
        divergence="reverse_kl",
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_shift_labels_and_3d(backend):
    p, labels = make_problem(n=24, seed=12)
    loss, grads = run_fused(p, labels, backend=backend, shift_labels=True, chunk_size=7)
    t_loss, t_grads = run_materialized(p, labels, shift_labels=True)
    tol = fused_tolerance(backend, p)
    assert_close(loss, t_loss, name="loss", **tol)
    assert_close(grads[0], t_grads[0], name="grad hidden", **tol)
    # [B, S, H] input: the shift happens inside each sequence.
    p3 = {k: v.reshape(2, 12, -1) if k.endswith("hidden") else v for k, v in p.items()}
    loss3, _ = run_fused(p3, labels.reshape(2, 12), backend=backend, shift_labels=True)
    per_seq = torch.cat([torch.cat([y[1:], y.new_full((1,), -100)]) for y in labels.reshape(2, 12)])
    t_loss3, _ = run_materialized(p, per_seq)
    assert_close(loss3, t_loss3, name="loss 3-d", **tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_tied_head(backend):
    """A tied embedding / lm_head gets both gradients, summed, as autograd would."""
    g = torch.Generator().manual_seed(13)
    device = device_for(backend)
    emb = torch.nn.Embedding(300, 16).to(device)
    ids = torch.randint(0, 300, (20,), generator=g).to(device)
    teacher_logits = torch.randn(20, 300, generator=g).to(device)
    labels = torch.randint(0, 300, (20,), generator=g).to(device)
    hidden = torch.tanh(emb(ids))
    fastkd.fused_linear_kd_loss(
        hidden, emb.weight, labels, teacher_logits=teacher_logits, backend=backend, chunk_size=6
    ).backward()
    fused = emb.weight.grad.clone()
    emb.weight.grad = None
    hidden = torch.tanh(emb(ids))
    fastkd.kd_loss(hidden @ emb.weight.t(), teacher_logits, labels, backend="reference").backward()
    assert_close(fused, emb.weight.grad, atol=1e-6, rtol=1e-5, name="tied weight grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_gradients_are_not_degraded(backend):
    """bf16 inputs: logits are fp32 inside, so gradients stay close to the fp32 truth. The
    peer-library bug (logits rounded to bf16 before the softmax) is measured for contrast."""
    p, labels = make_problem(n=64, hs=64, ht=64, v=2048, seed=14, scale=1.0)
    p = {k: None if v is None else v.bfloat16().double() for k, v in p.items()}  # exact in bf16
    loss, grads = run_fused(
        p, labels, dtype=torch.bfloat16, backend=backend, chunk_size=16, temperature=1.0
    )
    t_loss, t_grads = run_materialized(p, labels, temperature=1.0)

    def rel(a, b):
        return float((a.double() - b).norm() / b.norm())

    # The bug class: same math, but with logits rounded to bf16 first.
    s = [p[k].bfloat16().float().requires_grad_(True) for k in STUDENT]
    rounded = (s[0] @ s[1].t() + s[2]).bfloat16().float()
    teacher_rounded = _logits(*(p[k].float() for k in TEACHER)).bfloat16().float()
    fastkd.kd_loss(
        rounded, teacher_rounded, labels, temperature=1.0, backend="reference"
    ).backward()
    for name, g, t, peer in zip(STUDENT, grads, t_grads, s):
        ours, theirs = rel(g, t), rel(peer.grad, t)
        assert ours < 0.01, f"{name}: relative error {ours:.4f}"
        assert ours < theirs / 3, f"{name}: ours {ours:.4f} vs rounded logits {theirs:.4f}"
    assert abs(float(loss) - float(t_loss)) < 0.01 * abs(float(t_loss))


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_gets_no_gradient_and_nothing_is_kept(backend):
    p, labels = make_problem(seed=15)
    p = {k: None if v is None else v.to(device_for(backend)) for k, v in p.items()}
    teacher_hidden = p["teacher_hidden"].clone().requires_grad_(True)
    student_hidden = p["student_hidden"].clone().requires_grad_(True)
    loss = fastkd.fused_linear_kd_loss(
        student_hidden,
        p["student_weight"],
        labels.to(student_hidden.device),
        teacher_hidden=teacher_hidden,
        teacher_weight=p["teacher_weight"],
        backend=backend,
        chunk_size=8,
    )
    # Only the student gradient is kept for backward: no logits, no teacher activations.
    saved = [tuple(t.shape) for t in loss.grad_fn.saved_tensors if t is not None]
    assert saved == [tuple(student_hidden.shape)]
    loss.backward()
    assert teacher_hidden.grad is None and student_hidden.grad is not None


def test_module_matches_functional():
    p, labels = make_problem(seed=16)
    module = fastkd.FusedLinearKDLoss(temperature=3.0, alpha=0.2, divergence="jsd", chunk_size=8)
    assert "chunk_size=8" in repr(module)
    got = module(
        p["student_hidden"],
        p["student_weight"],
        labels,
        teacher_hidden=p["teacher_hidden"],
        teacher_weight=p["teacher_weight"],
    )
    expected = fastkd.fused_linear_kd_loss(
        p["student_hidden"],
        p["student_weight"],
        labels,
        teacher_hidden=p["teacher_hidden"],
        teacher_weight=p["teacher_weight"],
        temperature=3.0,
        alpha=0.2,
        divergence="jsd",
        chunk_size=8,
    )
    assert torch.equal(got, expected)


P, Y = make_problem(n=6, v=50, seed=17)
H, W, HT, WT = P["student_hidden"], P["student_weight"], P["teacher_hidden"], P["teacher_weight"]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({}, ValueError, "teacher is missing"),
        ({"teacher_hidden": HT}, ValueError, "teacher is missing"),
        (
            {"teacher_hidden": HT, "teacher_weight": WT, "teacher_logits": torch.randn(6, 50)},
            ValueError,
            "not both",
        ),
        ({"teacher_hidden": HT[:5], "teacher_weight": WT}, ValueError, "teacher_hidden shape"),
        ({"teacher_hidden": HT, "teacher_weight": WT[:, :5]}, ValueError, "teacher_weight must"),
        (
            {"teacher_hidden": HT, "teacher_weight": WT, "teacher_bias": torch.zeros(3)},
            ValueError,
            "teacher_bias",
        ),
        ({"teacher_logits": torch.randn(5, 50)}, ValueError, "teacher_logits shape"),
        ({"teacher_logits": torch.randn(6, 40)}, ValueError, "vocab"),
        (
            {"teacher_logits": torch.randn(6, 50), "student_bias": torch.zeros(49)},
            ValueError,
            "student_bias",
        ),
        ({"teacher_logits": torch.randn(6, 50), "chunk_size": 0}, ValueError, "chunk_size"),
        ({"teacher_logits": torch.randn(6, 50), "memory_budget": -1}, ValueError, "memory_budget"),
        (
            {"teacher_logits": torch.randn(6, 50), "chunk_size": 2, "memory_budget": 10},
            ValueError,
            "not both",
        ),
        ({"teacher_logits": torch.randn(6, 50), "alpha": 2.0}, ValueError, "alpha"),
        ({"teacher_logits": torch.randn(6, 50).long()}, TypeError, "teacher_logits must be"),
    ],
)
def test_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        fastkd.fused_linear_kd_loss(H, W, Y, **kwargs)


def test_bad_student_input():
    with pytest.raises(ValueError, match="student_weight must be"):
        fastkd.fused_linear_kd_loss(H, W[:, :3], Y, teacher_logits=torch.randn(6, 50))
    with pytest.raises(TypeError, match="student_weight has dtype"):
        fastkd.fused_linear_kd_loss(H, W.double(), Y, teacher_logits=torch.randn(6, 50))
    with pytest.raises(ValueError, match="labels"):
        fastkd.fused_linear_kd_loss(H, W, Y[:4], teacher_logits=torch.randn(6, 50))
    with pytest.raises(ValueError, match="labels"):
        fastkd.fused_linear_kd_loss(H, W, Y + 1000, teacher_logits=torch.randn(6, 50))


MEMORY_SETUP = """
    import torch, fastkd
    n, v, h = {n}, 32000, 64
    torch.manual_seed(0)
    hs = torch.randn(n, h, requires_grad=True)
    ws = (torch.randn(v, h) * 0.1).requires_grad_(True)
    ht, wt = torch.randn(n, h), torch.randn(v, h) * 0.1
    y = torch.randint(0, v, (n,))
    def run(k):
        fastkd.fused_linear_kd_loss(hs[:k], ws, y[:k], teacher_hidden=ht[:k], teacher_weight=wt,
                                    backend="cpu").backward()
        hs.grad = ws.grad = None
    run(64)  # load the kernels, start the thread pool
"""


@pytest.mark.slow
@pytest.mark.skipif(not fastkd.backends()["cpu"].available, reason="C++ backend not built")
def test_cpu_extra_memory_is_bounded_and_independent_of_n():
    """Peak memory of fwd + bwd beyond the inputs (fresh process, peak resident set): far
    below one [N, V] fp32 tensor at N=4096 and N=16384, and the same at both."""
    extra = {}
    for n in (4096, 16384):
        extra[n] = peak_memory_bytes(MEMORY_SETUP.format(n=n), f"run({n})")
        full = n * 32000 * 4
        # At most one default chunk (512 rows, fastkd.fused_linear_kd_loss.GEMM_ROWS) of both
        # models' fp32 logits: a quarter of [N, V] at N = 4096, plus the fp32 weight gradient.
        assert extra[n] < full / 3, f"N={n}: {extra[n] / 2**20:.0f} MiB extra"
    # What grows with N is grad_hidden (N x 64 fp32) and the labels: a few MiB.
    assert extra[16384] < extra[4096] + 16 * 2**20, extra
