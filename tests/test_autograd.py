"""Autograd and edges of kd_loss and fused_linear_kd_loss on every backend (docs/design.md §1,
§2, §5): the loss in fp32, gradients with respect to token weights, double backward, backward
twice through a retained graph, inplace_grad's aliasing rule, torch.compile, and the
validation of token weights, labels and 0-row inputs."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_close, device_for, kernel_backends, tolerance

import fastkd
from fastkd import LossOptions
from fastkd.reference import kd_loss_rows

BACKENDS = [pytest.param("reference", id="reference"), *kernel_backends()]
REDUCTIONS = ["mean", "sum", "none", "batchmean"]
FUNCTIONS = ["kd_loss", "fused"]
N, H, V = 7, 8, 37


def problem(seed=0):
    """Student hidden states and head, teacher logits, labels (one ignored) and token weights
    (one exactly 0), fp32 on the CPU."""
    g = torch.Generator().manual_seed(seed)
    p = {
        "hidden": torch.randn(N, H, generator=g),
        "weight": torch.randn(V, H, generator=g),
        "bias": torch.randn(V, generator=g) * 0.1,
        "teacher": torch.randn(N, V, generator=g) * 2,
        "labels": torch.randint(0, V, (N,), generator=g),
        "weights": torch.rand(N, generator=g) + 0.2,
    }
    p["labels"][1] = -100
    p["weights"][2] = 0.0
    return p


def student_logits(leaves):
    return leaves["hidden"] @ leaves["weight"].t() + leaves["bias"]


def run(fn, p, *, backend, dtype=torch.float32, grad_out=None, **kw):
    """Loss and gradients {hidden, weight, bias, weights} of one call on the backend's
    device. For kd_loss the logits are materialized from the same hidden states and head."""
    device = device_for(backend)
    leaves = {
        k: p[k].to(device=device, dtype=dtype, copy=True).requires_grad_(True)
        for k in ("hidden", "weight", "bias")
    }
    leaves["weights"] = p["weights"].to(device=device, copy=True).requires_grad_(True)
    teacher, labels = p["teacher"].to(device=device, dtype=dtype), p["labels"].to(device)
    if fn == "kd_loss":
        loss = fastkd.kd_loss(
            student_logits(leaves),
            teacher,
            labels,
            token_weights=leaves["weights"],
            backend=backend,
            **kw,
        )
    else:
        loss = fastkd.fused_linear_kd_loss(
            leaves["hidden"],
            leaves["weight"],
            labels,
            student_bias=leaves["bias"],
            teacher_logits=teacher,
            token_weights=leaves["weights"],
            backend=backend,
            chunk_size=3,
            **kw,
        )
    loss.backward(torch.ones_like(loss) if grad_out is None else grad_out.to(loss))
    return loss.detach().cpu(), {k: t.grad.cpu() for k, t in leaves.items()}


def truth(p, *, reduction="mean", grad_out=None, **kw):
    """The same loss in fp64 from the reference's weighted rows (differentiable in the token
    weights) and the reductions of docs/design.md §1 written out."""
    leaves = {
        k: p[k].double().requires_grad_(True) for k in ("hidden", "weight", "bias", "weights")
    }
    args = LossOptions(**kw).kernel_args(V, V)
    labels = p["labels"]
    rows = kd_loss_rows(
        student_logits(leaves), p["teacher"].double(), labels, leaves["weights"], args
    )
    counted = labels != args.ignore_index
    loss = {
        "none": rows,
        "sum": rows.sum(),
        "mean": rows.sum() / (leaves["weights"] * counted).sum(),
        "batchmean": rows.sum() / len(rows),
    }[reduction]
    loss.backward(torch.ones_like(loss) if grad_out is None else grad_out.double())
    return loss.detach(), {k: t.grad for k, t in leaves.items()}


def grad_out_for(reduction, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, generator=g) if reduction == "none" else torch.tensor(0.7)


# --- the loss dtype ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn", FUNCTIONS)
def test_fp16_sum_is_fp32_and_does_not_overflow(backend, fn):
    """48 tokens of CE ~2000 each in fp16: the sum, ~96000, is past fp16's max (65504), which
    a loss returned in the input dtype turned into inf; fastkd returns it in fp32."""
    n, v = 48, 16
    labels = torch.arange(n) % v
    hidden = -2000.0 * torch.nn.functional.one_hot(labels, v).to(torch.float16)
    expected = n * (2000.0 + math.log(v - 1))  # lse of (v - 1) zeros and -2000, minus -2000
    device = device_for(backend)
    hidden, labels = hidden.to(device), labels.to(device)
    if fn == "kd_loss":
        loss = fastkd.kd_loss(hidden, hidden, labels, alpha=1.0, reduction="sum", backend=backend)
    else:
        eye = torch.eye(v, dtype=torch.float16, device=device)
        loss = fastkd.fused_linear_kd_loss(
            hidden, eye, labels, alpha=1.0, reduction="sum", backend=backend
        )
    assert loss.dtype == torch.float32
    assert math.isclose(float(loss), expected, rel_tol=1e-6), (float(loss), expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_loss_dtype(backend, dtype):
    """fp32 for every kernel dtype, fp64 for fp64 (the reference's ground truth), in every
    return of both losses, KDLossParts included."""
    if dtype == torch.float64 and backend != "reference":
        pytest.skip("fp64 runs on the reference backend only")
    expected = torch.float64 if dtype == torch.float64 else torch.float32
    p = problem()
    for reduction in REDUCTIONS:
        for fn in FUNCTIONS:
            loss, grads = run(fn, p, backend=backend, dtype=dtype, reduction=reduction)
            assert loss.dtype == expected, (fn, reduction)
            assert grads["hidden"].dtype == dtype and grads["weight"].dtype == dtype
    device = device_for(backend)
    parts = fastkd.fused_linear_kd_loss(
        p["hidden"].to(device, dtype),
        p["weight"].to(device, dtype),
        p["labels"].to(device),
        teacher_logits=p["teacher"].to(device, dtype),
        backend=backend,
        return_parts=True,
    )
    assert [t.dtype for t in parts] == [expected] * 3


# --- gradients with respect to token weights --------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn", FUNCTIONS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_token_weight_gradients(backend, fn, reduction):
    """Weights that require grad get d loss / d w (for ``mean`` the denominator sum(w) depends
    on w too), and every other gradient stays right, against autograd of the fp64 reference.
    A weight of exactly 0 leaves its row unread: its gradient is the denominator's share
    alone, as the reference's."""
    p = problem(seed=3)
    grad_out = grad_out_for(reduction)
    kw = {"reduction": reduction, "divergence": "jsd", "alpha": 0.3, "temperature": 1.5}
    loss, grads = run(fn, p, backend=backend, grad_out=grad_out, **kw)
    t_loss, t_grads = truth(p, grad_out=grad_out, **kw)
    tol = tolerance(backend, torch.float32, V, temperature=1.5)
    tol = {k: v + 1e-5 for k, v in tol.items()}  # the fp32 GEMMs that feed the rows
    assert_close(loss, t_loss, name="loss", **tol)
    for name, g in grads.items():
        assert_close(g, t_grads[name], name=f"grad {name}", **tol)
    # Not one number for every weight (the bug this pins).
    assert t_grads["weights"].unique().numel() > 2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn", FUNCTIONS)
def test_token_weight_gradients_without_labels(backend, fn):
    """Distillation alone, no labels: every token counts in mean's denominator."""
    device = device_for(backend)
    p = problem(seed=15)
    tw = p["weights"].to(device, copy=True).requires_grad_(True)
    h, w, teacher = (p[k].to(device) for k in ("hidden", "weight", "teacher"))
    kw = {"alpha": 0.0, "token_weights": tw, "backend": backend}
    if fn == "kd_loss":
        fastkd.kd_loss(h @ w.t(), teacher, **kw).backward()
    else:
        fastkd.fused_linear_kd_loss(h, w, teacher_logits=teacher, **kw).backward()
    truth_w = p["weights"].double().requires_grad_(True)
    args = LossOptions(alpha=0.0).kernel_args(V, V)
    rows = kd_loss_rows(
        p["hidden"].double() @ p["weight"].double().t(), p["teacher"].double(), None, truth_w, args
    )
    (rows.sum() / truth_w.sum()).backward()
    tol = {k: v + 1e-5 for k, v in tolerance(backend, torch.float32, V).items()}
    assert_close(tw.grad, truth_w.grad, name="grad token_weights", **tol)


# --- double backward --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn", FUNCTIONS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_double_backward_is_a_clear_error(backend, fn, reduction):
    """create_graph=True would return gradients without their second derivative: an error
    that names fastkd and the way out."""
    device = device_for(backend)
    p = problem(seed=4)
    h = p["hidden"].to(device).requires_grad_(True)
    w = p["weight"].to(device).requires_grad_(True)
    teacher, labels = p["teacher"].to(device), p["labels"].to(device)
    if fn == "kd_loss":
        loss = fastkd.kd_loss(h @ w.t(), teacher, labels, reduction=reduction, backend=backend)
    else:
        loss = fastkd.fused_linear_kd_loss(
            h, w, labels, teacher_logits=teacher, reduction=reduction, backend=backend
        )
    name = "kd_loss" if fn == "kd_loss" else "fused_linear_kd_loss"
    with pytest.raises(RuntimeError, match=rf"fastkd\.{name} is differentiable once.*reference"):
        torch.autograd.grad(loss.sum(), (h, w), create_graph=True)


def test_the_named_way_out_has_second_derivatives():
    """The error's advice: fastkd.reference.kd_loss_rows on the logits is plain PyTorch, twice
    differentiable (here: a gradient penalty, checked with gradgradcheck)."""
    p = problem(seed=5)
    args = LossOptions(alpha=0.4, divergence="skew_kl").kernel_args(V, V)
    teacher, labels = p["teacher"].double(), p["labels"]
    z = student_logits({k: p[k].double() for k in ("hidden", "weight", "bias")})
    z.requires_grad_(True)
    assert torch.autograd.gradgradcheck(
        lambda x: kd_loss_rows(x, teacher, labels, None, args), (z,)
    )


# --- backward twice through a retained graph --------------------------------------------------

TWICE = ["kd_loss", "kd_loss-inplace", *(f"fused-{r}" for r in REDUCTIONS)]


def twice_setup(case, backend):
    """(loss, leaves, grad_out) for one case of test_backward_twice_with_retained_graph."""
    device = device_for(backend)
    p = problem(seed=6)
    leaves = [p[k].to(device).requires_grad_(True) for k in ("hidden", "weight", "weights")]
    h, w, tw = leaves
    teacher, labels = p["teacher"].to(device), p["labels"].to(device)
    reduction = case.split("-")[1] if case.startswith("fused") else "mean"
    if case.startswith("kd_loss"):
        loss = fastkd.kd_loss(
            h @ w.t(),
            teacher,
            labels,
            token_weights=tw,
            inplace_grad=case.endswith("inplace"),
            backend=backend,
        )
    else:
        loss = fastkd.fused_linear_kd_loss(
            h,
            w,
            labels,
            teacher_logits=teacher,
            token_weights=tw,
            reduction=reduction,
            chunk_size=3,
            backend=backend,
        )
    grad_out = grad_out_for(reduction).to(device)
    return loss, leaves, grad_out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", TWICE)
def test_backward_twice_with_retained_graph(backend, case):
    """As for PyTorch's own losses: a retained graph gives the same gradients every time, and
    a last backward without retain_graph too."""
    loss, leaves, grad_out = twice_setup(case, backend)
    first = torch.autograd.grad(loss, leaves, grad_out, retain_graph=True)
    second = torch.autograd.grad(loss, leaves, grad_out, retain_graph=True)
    loss.backward(grad_out)
    fresh_loss, fresh_leaves, _ = twice_setup(case, backend)
    fresh_loss.backward(grad_out)
    for a, b, leaf, fresh in zip(first, second, leaves, fresh_leaves):
        assert torch.equal(a, b) and torch.equal(a, leaf.grad) and torch.equal(a, fresh.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_backward_reuses_the_forward_buffers(backend):
    """The common case stays free of a copy: without a retained graph the weight gradient
    finished in forward becomes weight.grad itself, scaled in place."""
    loss, (_, w, _), grad_out = twice_setup("fused-mean", backend)
    buffer = loss.grad_fn.saved_tensors[1].data_ptr()
    loss.backward(grad_out)
    assert w.grad.data_ptr() == buffer


# --- inplace_grad and aliasing ----------------------------------------------------------------


def test_inplace_grad_refuses_a_leaf_or_a_view_of_one():
    teacher, labels = torch.randn(4, 10), torch.tensor([1, 2, 3, -100])
    leaf = torch.randn(4, 10, requires_grad=True)
    before = leaf.detach().clone()
    for student, what in [(leaf, "a leaf"), (leaf[:, :], "a view of a leaf")]:
        with pytest.raises(ValueError, match=f"inplace_grad=True .* {what} tensor"):
            fastkd.kd_loss(student, teacher, labels, inplace_grad=True)
    batched = torch.randn(2, 2, 10, requires_grad=True)  # a leaf the loss would reshape
    with pytest.raises(ValueError, match="a leaf tensor"):
        fastkd.kd_loss(batched, teacher.reshape(2, 2, 10), labels.reshape(2, 2), inplace_grad=True)
    assert torch.equal(leaf.detach(), before)  # refused before anything was written


def test_inplace_grad_on_views_of_non_leaves_and_on_tensors_without_grad():
    """A view of a graph tensor is fine (its gradient is the graph's, not a leaf's .grad); a
    tensor that needs no gradient is not written at all."""
    g = torch.Generator().manual_seed(7)
    teacher, labels = torch.randn(4, 10, generator=g), torch.tensor([1, 2, 3, -100])
    x = torch.randn(4, 12, generator=g, requires_grad=True)
    ref = torch.autograd.grad(fastkd.kd_loss(x[:, :10] * 1.0, teacher, labels), x)[0]
    wide = x * 1.0
    loss = fastkd.kd_loss(wide[:, :10], teacher, labels, inplace_grad=True)
    assert_close(torch.autograd.grad(loss, x)[0], ref, atol=1e-7, rtol=1e-6, name="grad")
    plain = torch.randn(4, 10, generator=g)
    copy = plain.clone()
    fastkd.kd_loss(plain, teacher, labels, inplace_grad=True)
    assert torch.equal(plain, copy)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_grad_over_logits_another_op_saved(backend):
    """Logits that another op saved for its backward are caught by autograd's version check
    (the kernels' write counts as an in-place edit), not silently turned into a gradient."""
    device = device_for(backend)
    p = problem(seed=14)
    h = p["hidden"].to(device).requires_grad_(True)
    logits = h @ p["weight"].to(device).t()
    other = logits.pow(2).sum()  # saves logits
    loss = fastkd.kd_loss(
        logits, p["teacher"].to(device), p["labels"].to(device), inplace_grad=True, backend=backend
    )
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (other + loss).backward()


# --- torch.compile ----------------------------------------------------------------------------


COMPILE_BACKENDS = ["reference", *kernel_backends()]


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
@pytest.mark.parametrize(
    "fn, reduction", [("kd_loss", "mean"), ("fused", "mean"), ("fused", "none")]
)
def test_torch_compile_fullgraph(backend, fn, reduction):
    """One graph (fullgraph=True), forward and backward, token weights with gradients
    included: the same loss and gradients as eager."""
    p = problem(seed=8)

    def step(p):
        return run(fn, p, backend=backend, reduction=reduction, grad_out=grad_out_for(reduction))

    def loss_only(h, w, b, tw, teacher, labels):
        if fn == "kd_loss":
            return fastkd.kd_loss(
                h @ w.t() + b,
                teacher,
                labels,
                token_weights=tw,
                reduction=reduction,
                backend=backend,
            )
        return fastkd.fused_linear_kd_loss(
            h,
            w,
            labels,
            student_bias=b,
            teacher_logits=teacher,
            token_weights=tw,
            reduction=reduction,
            chunk_size=3,
            backend=backend,
        )

    torch._dynamo.reset()
    compiled = torch.compile(loss_only, backend="aot_eager", fullgraph=True)
    device = device_for(backend)
    leaves = [
        p[k].to(device, copy=True).requires_grad_(True)
        for k in ("hidden", "weight", "bias", "weights")
    ]
    loss = compiled(*leaves, p["teacher"].to(device), p["labels"].to(device))
    loss.backward(grad_out_for(reduction).to(device))
    eager_loss, eager_grads = step(p)
    torch.testing.assert_close(loss.detach().cpu(), eager_loss)
    for leaf, name in zip(leaves, ("hidden", "weight", "bias", "weights")):
        torch.testing.assert_close(leaf.grad.cpu(), eager_grads[name], msg=name)


@pytest.mark.slow
@pytest.mark.skipif(not fastkd.backends()["cpu"].available, reason="C++ backend not built")
@pytest.mark.parametrize("fn", FUNCTIONS)
def test_torch_compile_inductor(fn):
    """The default compiler (inductor) too, on the C++ backend: the kernels stay opaque ops."""
    p = problem(seed=9)
    torch._dynamo.reset()
    leaves = [p[k].clone().requires_grad_(True) for k in ("hidden", "weight")]

    def loss_fn(h, w):
        if fn == "kd_loss":
            return fastkd.kd_loss(h @ w.t(), p["teacher"], p["labels"], backend="cpu")
        return fastkd.fused_linear_kd_loss(
            h, w, p["labels"], teacher_logits=p["teacher"], backend="cpu", chunk_size=3
        )

    compiled = torch.compile(loss_fn, fullgraph=True)
    compiled(*leaves).backward()
    eager = [p[k].clone().requires_grad_(True) for k in ("hidden", "weight")]
    loss_fn(*eager).backward()
    for a, b in zip(leaves, eager):
        torch.testing.assert_close(a.grad, b.grad)


def test_compiled_negative_weight_gives_nan():
    """Where a weight check would break the graph (under torch.compile, and on devices other
    than the CPU, where it would synchronise), a negative weight makes the loss NaN."""
    p = problem(seed=10)
    weights = p["weights"].clone()
    weights[0] = -1.0

    def loss_fn(z, tw):
        return fastkd.kd_loss(z, p["teacher"], p["labels"], token_weights=tw, backend="reference")

    torch._dynamo.reset()
    z = student_logits(p)
    assert torch.isnan(torch.compile(loss_fn, backend="aot_eager", fullgraph=True)(z, weights))
    assert torch.isfinite(loss_fn(z, p["weights"]))


# --- validation -------------------------------------------------------------------------------


def call(fn, p, **kw):
    if fn == "kd_loss":
        return fastkd.kd_loss(student_logits(p), p["teacher"], p["labels"], **kw)
    return fastkd.fused_linear_kd_loss(
        p["hidden"], p["weight"], p["labels"], teacher_logits=p["teacher"], **kw
    )


@pytest.mark.parametrize("fn", FUNCTIONS)
# 1e-45 is subnormal: mean's 1 / sum(w) would overflow.
@pytest.mark.parametrize("bad", [-0.5, math.nan, math.inf, -math.inf, 1e-45])
def test_bad_token_weights(fn, bad):
    p = problem(seed=11)
    weights = p["weights"].clone()
    weights[4] = bad
    with pytest.raises(
        ValueError, match=r"token_weights must be finite and 0 or >= 1.175e-38; token_weights\[4\]"
    ):
        call(fn, p, token_weights=weights)


@pytest.mark.parametrize("fn", FUNCTIONS)
@pytest.mark.parametrize("dtype", [torch.int16, torch.int8, torch.uint8, torch.bool, torch.float32])
def test_labels_dtype(fn, dtype):
    """int64 and int32 only: narrower types cannot hold a real vocabulary's ids, uint8 not
    even ignore_index, with or without the causal shift."""
    p = problem(seed=12)
    p["labels"] = p["labels"].clamp(min=0).to(dtype)
    for shift in [{}, {"shift_labels": True}] if fn == "fused" else [{}]:
        with pytest.raises(
            TypeError, match=f"labels must be an int64 or int32 tensor, got {dtype}"
        ):
            call(fn, p, **shift)


@pytest.mark.parametrize("fn", FUNCTIONS)
def test_int32_labels_equal_int64(fn):
    p = problem(seed=13)
    int32 = call(fn, {**p, "labels": p["labels"].int()}, reduction="none")
    assert torch.equal(int32, call(fn, p, reduction="none"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn", FUNCTIONS)
@pytest.mark.parametrize("shape", [(0,), (2, 0)], ids=["N=0", "B=2,S=0"])
def test_no_tokens(backend, fn, shape):
    """0 rows: no error; none -> empty, sum / mean / batchmean -> 0, in fp32; gradients of
    the inputs' (empty) shapes, and zero for the head."""
    device = device_for(backend)
    for reduction in REDUCTIONS:
        h = torch.randn(*shape, H, device=device, requires_grad=True)
        w = torch.randn(V, H, device=device, requires_grad=True)
        b = torch.randn(V, device=device, requires_grad=True)
        tw = torch.rand(shape, device=device, requires_grad=True)
        teacher = torch.randn(*shape, V, device=device)
        labels = torch.zeros(shape, dtype=torch.long, device=device)
        kw = {"token_weights": tw, "reduction": reduction, "backend": backend}
        if fn == "kd_loss":
            loss = fastkd.kd_loss(h @ w.t() + b, teacher, labels, **kw)
        else:
            loss = fastkd.fused_linear_kd_loss(
                h, w, labels, student_bias=b, teacher_logits=teacher, shift_labels=True, **kw
            )
        assert loss.dtype == torch.float32
        if reduction == "none":
            assert loss.shape == shape
        else:
            assert loss.shape == () and loss.item() == 0.0
        loss.sum().backward()
        assert h.grad.shape == h.shape and tw.grad.shape == tw.shape
        assert (w.grad == 0).all() and (b.grad == 0).all()
