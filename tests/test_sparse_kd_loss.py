"""sparse_kd_loss / fused_linear_sparse_kd_loss (a cached top-k teacher): the reference against
an independent fp64 computation over the bins, k = V against kd_loss, every backend against
the fp64 reference, the fused linear form against the loss on materialized logits, memory,
and bad input (docs/design.md §11)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_close, device_for, kernel_backends, tolerance

import fastkd
from fastkd._options import DIVERGENCES, TAILS, SparseKernelArgs, SparseLossOptions
from fastkd.memory import peak_memory_bytes
from fastkd.reference import TAIL_FLOOR, sparse_loss_rows

# The kernel backends with sparse ops (the CUDA C++ backend has none).
BACKENDS = [p for p in kernel_backends() if p.values[0] != "cuda"]


def make_inputs(n, v, k, *, temperature=2.0, seed=0, scale=3.0, ignore_frac=0.25):
    """Student logits, and the top-k of a random teacher at ``temperature``, fp64."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    teacher = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    top = torch.log_softmax(teacher / temperature, -1).topk(k, -1)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < ignore_frac] = -100
    return student, top.indices, top.values, labels, teacher


def loss_and_grad(student, ids, logprobs, labels, *, dtype=None, grad_out=None, **kw):
    dtype = dtype or student.dtype
    s = student.detach().to(dtype).requires_grad_(True)
    loss = fastkd.sparse_kd_loss(s, ids, logprobs, labels, **kw)
    loss.backward(grad_out if grad_out is not None else torch.ones_like(loss))
    return loss.detach(), s.grad


def check_backend(backend, student, ids, logprobs, labels, *, dtype=torch.float32, **kw):
    """Backend at ``dtype`` vs fp64 truth, allowing what the reference itself loses at
    ``dtype`` (the cached log-probabilities are given in fp32, as the kernels take them)."""
    dev = device_for(backend)
    lp32 = logprobs.float()

    def on(device, dt, name, lp):
        def put(t):
            return None if t is None else t.to(device)

        return loss_and_grad(
            put(student), put(ids), put(lp), put(labels), dtype=dt, backend=name, **kw
        )

    loss, grad = on(dev, dtype, backend, lp32)
    t_loss, t_grad = on("cpu", torch.float64, "reference", lp32.double())
    baseline = None if dtype == torch.float32 else on("cpu", dtype, "reference", lp32)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    tol = tolerance(backend, dtype, student.shape[-1], **kw)
    assert_close(loss, t_loss, None if baseline is None else baseline[0], name="loss", **tol)
    assert_close(grad, t_grad, None if baseline is None else baseline[1], name="grad", **tol)
    return loss, grad


# --- the reference against an independent computation ----------------------------------------


def _bins(student, ids, logprobs, temperature, tail):
    """The (P, Q) bin distributions of a tail mode, written out from the issue's definitions."""
    q = torch.softmax(student / temperature, -1)
    p_k, q_k = logprobs.exp(), q.gather(1, ids)
    if tail == "bucket":
        p_tail = (1 - p_k.sum(1, keepdim=True)).clamp_min(TAIL_FLOOR)
        q_tail = 1 - q_k.sum(1, keepdim=True)
        return torch.cat([p_k, p_tail], 1), torch.cat([q_k, q_tail], 1)
    p = p_k / p_k.sum(1, keepdim=True)
    return p, (q_k / q_k.sum(1, keepdim=True) if tail == "renormalize" else q_k)


def _divergence(p, q, kind, mix):
    def kl(a, b):
        return (a * (a.log() - b.log())).sum(1)

    if kind == "kl":
        return kl(p, q)
    if kind == "reverse_kl":
        return kl(q, p)
    if kind == "jsd":
        m = mix * p + (1 - mix) * q
        return mix * kl(p, m) + (1 - mix) * kl(q, m)
    if kind == "tvd":
        return 0.5 * (p - q).abs().sum(1)
    if kind == "skew_kl":
        return kl(p, mix * p + (1 - mix) * q)
    return kl(q, mix * q + (1 - mix) * p)  # skew_reverse_kl


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_reference_equals_the_bins_written_out(divergence, tail):
    temperature, alpha = 1.5, 0.3
    student, ids, logprobs, labels, _ = make_inputs(5, 13, 4, temperature=temperature)
    opts = dict(temperature=temperature, alpha=alpha, divergence=divergence, tail=tail)
    mix = {"jsd": 0.5, "skew_kl": 0.1, "skew_reverse_kl": 0.1}.get(divergence, 0.0)

    def truth(x):
        p, q = _bins(x, ids, logprobs, temperature, tail)
        kd = temperature**2 * _divergence(p, q, divergence, mix)
        ce = torch.nn.functional.cross_entropy(x, labels, reduction="none", ignore_index=-100)
        live = labels != -100
        return torch.where(live, (1 - alpha) * kd + alpha * ce, 0.0)

    x = student.clone().requires_grad_(True)
    rows = sparse_loss_rows(
        x, ids, logprobs, labels, None, SparseLossOptions(**opts).sparse_kernel_args()
    )
    rows.sum().backward()
    y = student.clone().requires_grad_(True)
    expected = truth(y)
    expected.sum().backward()
    torch.testing.assert_close(rows, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_k_equal_to_v_is_kd_loss(backend, divergence, tail):
    """With every token cached there is no tail: each mode is the dense loss."""
    temperature = 2.0
    student, ids, logprobs, labels, teacher = make_inputs(6, 37, 37, temperature=temperature)
    dtype = torch.float64 if backend == "reference" else torch.float32
    dev = device_for(backend)
    kw = dict(temperature=temperature, divergence=divergence, backend=backend)
    s = student.to(dev, dtype)
    sparse = loss_and_grad(s, ids.to(dev), logprobs.to(dev, dtype), labels.to(dev), tail=tail, **kw)
    s2 = s.detach().clone().requires_grad_(True)
    loss = fastkd.kd_loss(s2, teacher.to(dev, dtype), labels.to(dev), **kw)
    loss.backward()
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(sparse[0], loss.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(sparse[1], s2.grad, rtol=tol, atol=tol)


# --- every backend against the fp64 reference -------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backend_matches_reference(backend, divergence, tail, dtype):
    student, ids, logprobs, labels, _ = make_inputs(7, 67, 5, temperature=2.0, seed=1)
    check_backend(
        backend, student, ids, logprobs, labels, dtype=dtype, divergence=divergence, tail=tail
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 8, 64])
@pytest.mark.parametrize("temperature", [0.7, 1.0, 4.0])
def test_wide_rows_and_temperatures(backend, k, temperature):
    """V = 3001 crosses the kernels' tiles; T = 1 takes the CPU's shared-exponential path."""
    student, ids, logprobs, labels, _ = make_inputs(3, 3001, k, temperature=temperature, seed=2)
    check_backend(backend, student, ids, logprobs, labels, temperature=temperature, alpha=0.2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
def test_minus_inf_logits_and_log_probabilities(backend, divergence, tail):
    """A masked student vocabulary (outside K, and at a cached id: kl is then +inf where the
    teacher has mass there) and cached ids of probability 0."""
    student, ids, logprobs, labels, _ = make_inputs(6, 41, 6, seed=3, ignore_frac=0.0)
    cached = student.gather(1, ids)
    student[:, ::5] = -math.inf
    student.scatter_(1, ids, cached)  # masked outside K only
    student[0, ids[0, 2]] = -math.inf  # a cached id the student masks, the teacher does not
    logprobs[1, 3:] = -math.inf  # cached ids of teacher probability 0 ...
    student[1, ids[1, 4]] = -math.inf  # ... one of which the student masks too
    loss, _ = check_backend(
        backend, student, ids, logprobs, labels, divergence=divergence, tail=tail, reduction="none"
    )
    if divergence == "kl":
        assert loss[0] == math.inf and torch.isfinite(loss[1:]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none", "batchmean"])
def test_weights_reductions_and_grad_output(backend, reduction):
    student, ids, logprobs, labels, _ = make_inputs(2 * 5, 29, 3, seed=4)
    shape = (2, 5)
    weights = torch.rand(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    weights[0, 1] = 0.0
    grad_out = torch.randn(shape) if reduction == "none" else None
    check_backend(
        backend,
        student.reshape(*shape, -1),
        ids.reshape(*shape, -1),
        logprobs.reshape(*shape, -1),
        labels.reshape(shape),
        reduction=reduction,
        token_weights=weights.float().to(device_for(backend)),
        grad_out=grad_out,
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_labels_softcap_and_scale(backend):
    student, ids, logprobs, _, _ = make_inputs(5, 50, 7, seed=5)
    check_backend(
        backend,
        student,
        ids,
        logprobs,
        None,
        alpha=0.0,
        student_softcap=4.0,
        student_logit_scale=0.8,
        divergence="skew_reverse_kl",
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl"])
def test_student_with_almost_all_mass_in_k(backend, divergence):
    """The student's tail below TAIL_FLOOR: the floor holds, the loss stays finite, and the
    gradient of the cached columns, which carries q_raw / q_eff (the floor is straight
    through), keeps the tight tolerance: the kernels' stats keep q_raw relatively accurate
    (docs/design.md §11)."""
    student, ids, logprobs, labels, _ = make_inputs(4, 30, 6, seed=6)
    student.scatter_(1, ids, 30.0)
    loss, grad = check_backend(
        backend, student, ids, logprobs, labels, divergence=divergence, reduction="none"
    )
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("boost", [4.0, 7.0, 10.0])
def test_large_logits_and_a_small_student_tail(backend, boost):
    """A trained student's rows: large logits (|T lse(x / T)| ~ 30) and most of the mass on the
    cached ids, so that the tail bin q_raw = 1 - sum_K q is 1e-1 .. 1e-4. Its error becomes a
    relative error of the tail bin and of every column outside K: each backend keeps the
    tight fp32 tolerance."""
    student, ids, logprobs, labels, _ = make_inputs(8, 500, 16, temperature=1.0, seed=15)
    student += 20.0
    student.scatter_add_(1, ids, torch.full(ids.shape, boost, dtype=student.dtype))
    check_backend(
        backend, student, ids, logprobs, labels, temperature=1.0, alpha=0.0, reduction="none"
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_grad_equals_a_separate_gradient(backend):
    student, ids, logprobs, labels, _ = make_inputs(6, 45, 4, seed=7)
    dev = device_for(backend)
    put = dict(device=dev)
    args = (ids.to(**put), logprobs.float().to(**put), labels.to(**put))
    x = student.float().to(**put).requires_grad_(True)
    fastkd.sparse_kd_loss(x, *args, backend=backend).backward()
    y = student.float().to(**put).requires_grad_(True)
    fastkd.sparse_kd_loss(y * 1.0, *args, backend=backend, inplace_grad=True).backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    student, ids, logprobs, labels, _ = make_inputs(4, 23, 3, seed=8)
    dev = device_for(backend)
    prefix = "triton_" if backend == "triton" else ""
    args = SparseLossOptions(divergence="jsd").sparse_kernel_args()
    x = student.float().to(dev)
    tensors = (x, ids.to(dev), logprobs.float().to(dev), labels.to(dev), None)
    fwd = getattr(torch.ops.fastkd, f"{prefix}sparse_kd_loss_fwd")
    torch.library.opcheck(fwd, (*tensors, *args))
    _, stats = fwd(*tensors, *args)
    grad_loss = torch.ones(4, device=dev)
    bwd = getattr(torch.ops.fastkd, f"{prefix}sparse_kd_loss_bwd")
    torch.library.opcheck(bwd, (*tensors, stats, grad_loss, *args, torch.empty_like(x)))


# --- the fused linear form --------------------------------------------------------------------


def _fused_inputs(n=12, h=16, v=53, k=5, seed=9):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) * 0.5
    bias = torch.randn(v, generator=g, dtype=torch.float64)
    _, ids, logprobs, labels, _ = make_inputs(n, v, k, seed=seed)
    return hidden, weight, bias, ids, logprobs.float(), labels


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("chunk_size", [1, 5, None])
def test_fused_linear_matches_materialized(backend, tail, reduction, chunk_size):
    dev = device_for(backend)
    hidden, weight, bias, ids, logprobs, labels = (
        t.to(dev) for t in _fused_inputs(seed=10 + (chunk_size or 0))
    )
    kw = dict(tail=tail, reduction=reduction, divergence="jsd", backend=backend, alpha=0.3)
    weights = torch.rand(12, device=dev)
    grad_out = torch.randn(12, device=dev) if reduction == "none" else torch.tensor(1.7)

    def run(fused):
        h = hidden.float().requires_grad_(True)
        w = weight.float().requires_grad_(True)
        b = bias.float().requires_grad_(True)
        tw = weights.clone().requires_grad_(True)
        if fused:
            loss = fastkd.fused_linear_sparse_kd_loss(
                h,
                w,
                ids,
                logprobs,
                labels,
                student_bias=b,
                token_weights=tw,
                chunk_size=chunk_size,
                **kw,
            )
        else:
            loss = fastkd.sparse_kd_loss(h @ w.T + b, ids, logprobs, labels, token_weights=tw, **kw)
        loss.backward(grad_out.to(dev))
        return loss.detach(), h.grad, w.grad, b.grad, tw.grad

    for name, a, b in zip(("loss", "hidden", "weight", "bias", "weights"), run(True), run(False)):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_shift_labels_3d_and_parts(backend):
    dev = device_for(backend)
    hidden, weight, _, ids, logprobs, labels = (t.to(dev) for t in _fused_inputs(n=2 * 6))
    hidden, ids, logprobs = hidden.float().reshape(2, 6, -1), ids.reshape(2, 6, -1), logprobs
    labels = labels.reshape(2, 6)
    parts = fastkd.fused_linear_sparse_kd_loss(
        hidden,
        weight.float(),
        ids,
        logprobs.reshape(2, 6, -1),
        labels,
        shift_labels=True,
        return_parts=True,
        backend=backend,
        alpha=0.4,
    )
    shifted = torch.full_like(labels, -100)
    shifted[:, :-1] = labels[:, 1:]
    logits = hidden @ weight.float().T
    expected = fastkd.sparse_kd_loss(
        logits, ids, logprobs.reshape(2, 6, -1), shifted, backend=backend, alpha=0.4
    )
    ce = fastkd.sparse_kd_loss(
        logits,
        ids,
        logprobs.reshape(2, 6, -1),
        shifted,
        backend=backend,
        kd_weight=0.0,
        ce_weight=0.4,
    )
    torch.testing.assert_close(parts.loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts.ce, ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts.kd + parts.ce, parts.loss)


def test_modules_match_functional():
    student, ids, logprobs, labels, _ = make_inputs(6, 31, 4, seed=11)
    module = fastkd.SparseKDLoss(temperature=2.0, alpha=0.2, tail="renormalize")
    expected = fastkd.sparse_kd_loss(
        student, ids, logprobs, labels, temperature=2.0, alpha=0.2, tail="renormalize"
    )
    torch.testing.assert_close(module(student, ids, logprobs, labels), expected)
    hidden, weight, _, ids, logprobs, labels = _fused_inputs()
    fused = fastkd.FusedLinearSparseKDLoss(divergence="reverse_kl", tail="ignore")
    expected = fastkd.fused_linear_sparse_kd_loss(
        hidden, weight, ids, logprobs, labels, divergence="reverse_kl", tail="ignore"
    )
    torch.testing.assert_close(fused(hidden, weight, ids, logprobs, labels), expected)
    with pytest.raises(ValueError, match="tail"):
        fastkd.SparseKDLoss(tail="drop")


def test_signature_takes_tail_and_no_teacher_transform():
    import inspect

    params = inspect.signature(fastkd.sparse_kd_loss).parameters
    assert "tail" in params and "teacher_softcap" not in params and "vocab" not in params
    assert "tail:" in fastkd.fused_linear_sparse_kd_loss.__doc__


MEMORY_SETUP = """
    import torch, fastkd
    n, v, h, k = {n}, 32000, 64, 64
    torch.manual_seed(0)
    hs = torch.randn(n, h, requires_grad=True)
    ws = (torch.randn(v, h) * 0.1).requires_grad_(True)
    ids = torch.arange(k) * 499 + torch.randint(0, 499, (n, 1))  # distinct: 64 * 499 < v
    lp = torch.log_softmax(torch.randn(n, k), -1) + torch.log(torch.tensor(0.9))
    y = torch.randint(0, v, (n,))
    def run(m):
        fastkd.fused_linear_sparse_kd_loss(hs[:m], ws, ids[:m], lp[:m], y[:m],
                                           backend="cpu").backward()
        hs.grad = ws.grad = None
    run(64)  # load the kernels, start the thread pool
"""


@pytest.mark.slow
@pytest.mark.skipif(not fastkd.backends()["cpu"].available, reason="C++ backend not built")
def test_fused_linear_extra_memory_is_independent_of_n():
    """Peak memory of fwd + bwd beyond the inputs (fresh process): far below the student's
    [N, V] fp32 logits, and growing with N only by what is O(k + H) a row."""
    extra = {}
    for n in (4096, 16384):
        extra[n] = peak_memory_bytes(MEMORY_SETUP.format(n=n), f"run({n})")
        assert extra[n] < n * 32000 * 4 / 4, f"N={n}: {extra[n] / 2**20:.0f} MiB extra"
    # Per row: grad_hidden (4 H bytes) and the CPU value checks of the cached rows (their k ids
    # and log-probabilities sorted, compared, exponentiated: under 24 k bytes); 15.8 MiB in all
    # here, where one more [N, V] fp32 buffer would add 1500 MiB.
    per_row = 4 * 64 + 24 * 64
    assert extra[16384] < extra[4096] + (16384 - 4096) * per_row, extra


# --- bad input --------------------------------------------------------------------------------


def _bad(**changes):
    student, ids, logprobs, labels, _ = make_inputs(4, 10, 3, seed=12, ignore_frac=0.0)
    inputs = dict(student=student.float(), ids=ids, logprobs=logprobs.float(), labels=labels)
    options = changes.pop("options", {})
    for name, edit in changes.items():
        inputs[name] = edit(inputs[name])
    fastkd.sparse_kd_loss(
        inputs["student"], inputs["ids"], inputs["logprobs"], inputs["labels"], **options
    )


def _set(index, value):
    def edit(t):
        t = t.clone()
        t[index] = value
        return t

    return edit


@pytest.mark.parametrize(
    "changes, error, match",
    [
        (dict(ids=lambda t: t.float()), TypeError, "teacher_ids must be an int64 or int32"),
        (dict(logprobs=lambda t: t.long()), TypeError, "teacher_logprobs must be float"),
        (dict(ids=lambda t: t[:, :2]), ValueError, "teacher_logprobs must have the shape"),
        (dict(ids=lambda t: t[:3], logprobs=lambda t: t[:3]), ValueError, "teacher_ids must"),
        (
            dict(
                ids=lambda t: torch.arange(11).repeat(4, 1),
                logprobs=lambda t: t[:, :1].repeat(1, 11),
            ),
            ValueError,
            "1 to V = 10 ids",
        ),
        (dict(ids=_set((1, 2), 10)), ValueError, r"ids must be in \[0, 10\).*token 1"),
        (dict(ids=_set((2, 2), -1)), ValueError, r"ids must be in \[0, 10\).*token 2"),
        (dict(ids=lambda t: t[:, [0, 1, 0]]), ValueError, "distinct"),
        (dict(logprobs=_set((0, 1), math.nan)), ValueError, "NaN"),
        (dict(logprobs=_set((3, 0), 0.5)), ValueError, "<= 0.*token 3"),
        (dict(logprobs=lambda t: torch.full_like(t, -0.5)), ValueError, "at most 1"),
        (
            dict(logprobs=_set(0, -math.inf), options=dict(tail="renormalize")),
            ValueError,
            "all be -inf",
        ),
        (dict(options=dict(teacher_softcap=3.0)), ValueError, "teacher_softcap does not apply"),
        (dict(options=dict(vocab="pad")), ValueError, "vocab does not apply"),
        (dict(options=dict(tail="zero")), ValueError, "tail must be one of"),
        (dict(options=dict(backend="cuda")), ValueError, "no sparse"),
    ],
)
def test_bad_input(changes, error, match):
    with pytest.raises(error, match=match):
        _bad(**changes)


def test_bad_rows_that_do_not_count_are_not_checked():
    """As for the dense losses, a row that does not count is not read: its cache may hold
    anything."""
    student, ids, logprobs, labels, _ = make_inputs(4, 10, 3, seed=13, ignore_frac=0.0)
    labels[1] = -100
    ids[1, 0] = 99
    logprobs[1, 0] = math.nan
    loss = fastkd.sparse_kd_loss(student, ids, logprobs, labels, reduction="none")
    assert loss[1] == 0 and torch.isfinite(loss).all()


# --- the argument order of the sparse ops -----------------------------------------------------

SPARSE_BASE = SparseKernelArgs(
    divergence=DIVERGENCES.index("jsd"),
    temperature=1.5,
    kd_weight=0.6,
    ce_weight=0.4,
    mix=0.3,
    ignore_index=7,
    tail=TAILS.index("bucket"),
    student_scale=1.1,
    student_softcap=0.0,
)
SPARSE_CHANGES = {
    "divergence": {"divergence": DIVERGENCES.index("tvd")},
    "temperature": {"temperature": 0.8},
    "kd_weight": {"kd_weight": 0.9},
    "ce_weight": {"ce_weight": 0.1},
    "mix": {"mix": 0.6},
    "ignore_index": {"ignore_index": 8},
    "tail": {"tail": TAILS.index("ignore")},
    "student_scale": {"student_scale": 0.5},
    "student_softcap": {"student_softcap": 3.0},
    "swap weights": {"kd_weight": SPARSE_BASE.ce_weight, "ce_weight": SPARSE_BASE.kd_weight},
    "swap scale and temperature": {"temperature": 1.1, "student_scale": 1.5},
}


def test_sparse_changes_cover_every_field():
    assert {k for c in SPARSE_CHANGES.values() for k in c} == set(SparseKernelArgs._fields)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("change", SPARSE_CHANGES.values(), ids=SPARSE_CHANGES.keys())
def test_every_sparse_field_moves_the_result_as_the_reference(backend, change):
    """Each field changed alone (and pairs swapped) moves a kernel's loss and gradient as it
    moves the reference's: an argument-order drift in any backend fails here."""
    from fastkd.backends import get_backend

    kernel, reference = get_backend(backend), get_backend("reference")
    kernel.load()
    student, ids, logprobs, labels, _ = make_inputs(6, 43, 5, seed=14, ignore_frac=0.0)
    labels[0], labels[1] = 7, 8
    weights = torch.rand(6, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5
    grad_loss = torch.randn(6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    dev = device_for(backend)

    def run(impl, args, dtype, device):
        s, lp, w, gl = (t.to(device, dtype) for t in (student, logprobs, weights, grad_loss))
        i, y = ids.to(device), labels.to(device)
        loss, stats = impl.sparse_fwd(s, i, lp, y, w, args)
        grad = torch.empty_like(s)
        impl.sparse_bwd(s, i, lp, y, w, stats, gl, args, grad)
        return loss, grad

    args = SPARSE_BASE._replace(**change)
    base = run(kernel, SPARSE_BASE, torch.float32, dev)
    loss, grad = run(kernel, args, torch.float32, dev)
    truth_loss, truth_grad = run(reference, args, torch.float64, "cpu")
    assert not torch.equal(loss, base[0]) and not torch.equal(grad, base[1])
    tol = tolerance(backend, torch.float32, 43, temperature=args.temperature)
    assert_close(loss, truth_loss, name="loss", **tol)
    assert_close(grad, truth_grad, name="grad", **tol)


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("fused", [False, True])
def test_torch_compile_fullgraph(backend, fused):
    """One graph (fullgraph=True, aot_eager), forward and backward: the same loss and
    gradients as eager."""
    dev = device_for(backend)
    hidden, weight, _, ids, logprobs, labels = (t.to(dev) for t in _fused_inputs(seed=16))
    tw = torch.rand(12, device=dev)

    def loss_fn(h, w, tw):
        if fused:
            return fastkd.fused_linear_sparse_kd_loss(
                h, w, ids, logprobs, labels, token_weights=tw, backend=backend, tail="bucket"
            )
        return fastkd.sparse_kd_loss(
            h @ w.t(), ids, logprobs, labels, token_weights=tw, backend=backend, tail="bucket"
        )

    def run(fn):
        h = hidden.float().requires_grad_(True)
        w = weight.float().requires_grad_(True)
        t = tw.clone().requires_grad_(True)
        loss = fn(h, w, t)
        loss.backward()
        return loss.detach(), h.grad, w.grad, t.grad

    eager = run(loss_fn)
    compiled = run(torch.compile(loss_fn, backend="aot_eager", fullgraph=True))
    for name, a, b in zip(("loss", "hidden", "weight", "weights"), compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
