"""The Triton launchers: the row split into aligned vectors and edges, the alignment they
choose, and launching on the tensors' device and stream (docs/design.md §5); the sparse
kernels' layouts, in-place gradient and out-of-range ids (§11)."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from conftest import ULP, assert_close, device_for, tolerance

import fastkd
from fastkd._options import DIVERGENCE_CODES, DIVERGENCES, TAILS, LossOptions, SparseKernelArgs
from fastkd.backends import get_backend

if not (status := fastkd.backends()["triton"]).available:
    pytest.skip(status.reason, allow_module_level=True)

from fastkd.kernels import kd_loss as tk  # after the skip: needs triton
from fastkd.kernels import sparse_kd_loss as sk


def rows(n, v, *, seed, dtype=torch.float32, width=None, offset=0, device="cpu"):
    """Student and teacher logits [n, v] inside rows of ``width`` columns starting at column
    ``offset`` (a strided view when they differ from v and 0), and labels."""
    g = torch.Generator().manual_seed(seed)
    width = width or v
    s = (torch.randn(n, width, generator=g) * 3).to(dtype)[:, offset : offset + v]
    t = (torch.randn(n, width, generator=g) * 3).to(dtype)[:, offset : offset + v]
    labels = torch.randint(0, v, (n,), generator=g)
    labels[0] = -100
    return s.to(device), t.to(device), labels.to(device)


def check(student, teacher, labels, gpu_math=None, **kw):
    """Triton's loss and gradient against the fp64 reference on the same (rounded) inputs."""
    s = student.detach().requires_grad_(True)
    loss = fastkd.kd_loss(s, teacher, labels, reduction="none", backend="triton", **kw)
    loss.backward(torch.linspace(0.5, 1.5, loss.numel(), device=loss.device))
    ref = student.detach().cpu().double().requires_grad_(True)
    t_loss = fastkd.kd_loss(
        ref, teacher.cpu().double(), labels.cpu(), reduction="none", backend="reference", **kw
    )
    t_loss.backward(torch.linspace(0.5, 1.5, loss.numel(), dtype=torch.float64))
    tol = tolerance("triton", student.dtype, student.shape[1], gpu_math=gpu_math, **kw)
    assert_close(loss, t_loss, name="loss", **tol)
    assert_close(s.grad, ref.grad, name="grad", **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("v", [1, 3, 7, 9, 17, 37])
def test_short_odd_rows(dtype, v):
    """Rows shorter than a vector, and a few vectors long, at every offset from a 16-byte
    boundary (row i of an odd-width tensor starts i * v columns in): head, aligned part and
    tail of the row split all in play."""
    student, teacher, labels = rows(9, v, seed=v, dtype=dtype)
    assert tk._alignment(student, (teacher,)) == 16 // student.element_size()
    check(student, teacher, labels, divergence="jsd", beta=0.3, alpha=0.4)


@pytest.mark.parametrize("divergence", ["kl", "tvd", "skew_reverse_kl"])
def test_padded_row_stride(divergence):
    """Rows of 1031 columns in a tensor 1037 wide: every row starts elsewhere modulo 4."""
    student, teacher, labels = rows(6, 1031, seed=1, width=1037)
    assert tk._alignment(student, (teacher,)) == 4
    check(student, teacher, labels, divergence=divergence, temperature=1.5)


def test_unaligned_view_falls_back_to_elements():
    """A view starting one column into its storage is not 16-byte aligned: ALIGN 1."""
    student, teacher, labels = rows(5, 300, seed=2, width=310, offset=1)
    assert tk._alignment(student, (teacher,)) == 1
    check(student, teacher, labels, divergence="reverse_kl")


def test_vocab_mismatch_keeps_the_split():
    """A teacher with fewer columns (vocab='pad') masks its loads past Vt (KD_FULL off)."""
    student, _, labels = rows(4, 203, seed=3)
    _, teacher, _ = rows(4, 190, seed=4)
    check(student, teacher, labels, vocab="pad", divergence="skew_kl", skew=0.2)


def approximate_gpu_math(monkeypatch, sign):
    """Make the interpreter's fp32 exp off by 2 + 1.173 |x| ulp and its division by 2 ulp, the
    most a GPU's approximate instructions may be off by (docs/design.md §7): all up, or either
    way by the parity of the result's last bit (``sign`` "mixed")."""
    from triton.runtime.interpreter import InterpreterBuilder

    def off_by(result, ulps):
        if result.data.dtype == np.float32:
            direction = 1
            if sign == "mixed":
                direction = np.where(result.data.view(np.int32) & 1, 1, -1)
            exact = result.data.astype(np.float64)
            result.data = (exact * (1 + direction * ulps * ULP)).astype(np.float32)
        return result

    def exp(self, x):
        finite = np.where(x.data > -np.inf, x.data, 0)  # exp(-inf) = 0 exactly
        return off_by(exact_exp(self, x), 2 + 1.173 * np.abs(finite))

    exact_exp, exact_div = InterpreterBuilder.create_exp, InterpreterBuilder.create_fdiv
    monkeypatch.setattr(InterpreterBuilder, "create_exp", exp)
    monkeypatch.setattr(
        InterpreterBuilder, "create_fdiv", lambda self, a, b: off_by(exact_div(self, a, b), 2)
    )


@pytest.mark.parametrize("sign", ["up", "mixed"])
@pytest.mark.parametrize(
    "options",
    [{"divergence": d} for d in DIVERGENCES]
    + [
        {"temperature": 10.0},
        {"temperature": 0.5, "student_softcap": 20.0, "teacher_softcap": 30.0},
    ],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()),
)
def test_tolerance_covers_gpu_math(monkeypatch, sign, options):
    """The GPU tolerance model (docs/design.md §7) on the kernels themselves: run them with
    every exp off by 2 + 1.173 |x| ulp and every division by 2 ulp, what a GPU may be off by,
    all up or either way, and the results stay within the tolerance for Triton on a GPU."""
    approximate_gpu_math(monkeypatch, sign)
    student, teacher, labels = rows(6, 8191, seed=7)
    check(student, teacher, labels, gpu_math=True, beta=0.3, skew=0.2, **options)


def test_alignment_needs_every_tensor():
    """ALIGN is the vector width only if all rows read or written share the split."""
    student = torch.empty(4, 50257)
    assert tk._alignment(student, (torch.empty(4, 50257),)) == 4
    assert tk._alignment(student.bfloat16(), (torch.empty(4, 50257, dtype=torch.bfloat16),)) == 8
    assert tk._alignment(student, (torch.empty(4, 50258)[:, :50257],)) == 1  # other stride
    assert tk._alignment(student, (torch.empty(4, 50261)[:, :50257],)) == 4  # same mod 4
    assert tk._alignment(student, (torch.empty(4, 50258)[:, 1:],)) == 1  # unaligned start


def test_launch_meta_uses_launch_config():
    student = torch.empty(2, 50257, dtype=torch.bfloat16)
    args = LossOptions().kernel_args(50257, 50257)
    meta = tk.launch_meta(student, student, None, None, args)
    config = tk.launch_config(50257)
    assert (meta["BLOCK"], meta["num_warps"]) == (config.block, config.num_warps)
    assert meta["ALIGN"] == 8 and meta["KD_FULL"]


def test_device_guard():
    """The launchers make the tensors' CUDA device current (so Triton launches there, on its
    current stream); CPU tensors (the interpreter) need no guard. Entering the guard needs a
    GPU, building it does not."""
    assert isinstance(tk.on_device(torch.device("cpu")), contextlib.nullcontext)
    guard = tk.on_device(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1


def _slow_copy(dst, src):
    """dst.copy_(src) on the current stream after keeping that stream busy, so that a kernel
    launched on another stream would read dst before the copy lands."""
    torch.cuda._sleep(200_000_000)
    dst.copy_(src)


@pytest.mark.gpu
@pytest.mark.skipif(device_for("triton").type != "cuda", reason="needs a CUDA device")
def test_launch_on_current_stream():
    student, teacher, labels = rows(8, 5003, seed=5, device="cuda")
    fresh = torch.zeros_like(student)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        _slow_copy(fresh, student)
        loss = fastkd.kd_loss(fresh, teacher, labels, reduction="none", backend="triton")
    side.synchronize()
    expected = fastkd.kd_loss(student, teacher, labels, reduction="none", backend="triton")
    assert torch.equal(loss, expected)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_launch_on_tensors_device():
    """Student on cuda:1 while cuda:0 is current, inputs written on cuda:1's current (side)
    stream: the kernels must run on cuda:1 and that stream."""
    student, teacher, labels = rows(8, 5003, seed=6, device="cuda:1")
    fresh = torch.zeros_like(student)
    side = torch.cuda.Stream(device="cuda:1")
    with torch.cuda.stream(side), torch.cuda.device(0):
        with torch.cuda.device(1):
            _slow_copy(fresh, student)
        s = fresh.requires_grad_(True)
        loss = fastkd.kd_loss(s, teacher, labels, reduction="none", backend="triton")
        loss.backward(torch.ones_like(loss))
        assert torch.cuda.current_device() == 0
    side.synchronize()
    assert loss.device == torch.device("cuda", 1) and s.grad.device == loss.device
    ref = student.detach().requires_grad_(True)
    with torch.cuda.device(1):
        expected = fastkd.kd_loss(ref, teacher, labels, reduction="none", backend="triton")
        expected.backward(torch.ones_like(expected))
    assert torch.equal(loss, expected) and torch.equal(s.grad, ref.grad)


# --- the sparse kernels (a cached top-k teacher, docs/design.md §11) ---------------------------


def sparse_rows(n, v, k, *, seed, width=None, offset=0, k_width=None):
    """Student logits [n, v] inside rows of ``width`` columns from column ``offset``, the top-k
    of a random teacher at T = 2 as ids and log-probabilities [n, k] inside rows of ``k_width``
    (in a random order), and labels."""
    g = torch.Generator().manual_seed(seed)
    width, k_width = width or v, k_width or k
    student = (torch.randn(n, width, generator=g) * 3)[:, offset : offset + v]
    top = torch.log_softmax(torch.randn(n, v, generator=g) * 1.5, -1).topk(k, -1)
    order = torch.randperm(k, generator=g)
    ids = torch.zeros(n, k_width, dtype=torch.int64)
    logprobs = torch.zeros(n, k_width)
    ids[:, :k], logprobs[:, :k] = top.indices[:, order], top.values[:, order]
    labels = torch.randint(0, v, (n,), generator=g)
    labels[0] = -100
    return student, ids[:, :k], logprobs[:, :k], labels


def sparse_check(student, ids, logprobs, labels, *, inplace=False, gpu_math=None, **fields):
    """The sparse ops on Triton against the fp64 reference's, from the op level (no input
    checks, the layouts as given); ``inplace``: the gradient written over the student;
    ``gpu_math``: the tolerance for Triton on a GPU (``tolerance``)."""
    args = SparseKernelArgs(
        divergence=DIVERGENCE_CODES["kl"], temperature=2.0, kd_weight=0.6, ce_weight=0.4,
        mix=0.0, ignore_index=-100, tail=TAILS.index("bucket"), student_scale=1.0,
        student_softcap=0.0,
    )._replace(**fields)  # fmt: skip
    triton, reference = get_backend("triton"), get_backend("reference")
    triton.load()
    grad_loss = torch.linspace(0.5, 1.5, student.shape[0])
    s = student.clone() if inplace else student
    loss, stats = triton.sparse_fwd(s, ids, logprobs, labels, None, args)
    grad = s if inplace else torch.empty_like(student)
    triton.sparse_bwd(s, ids, logprobs, labels, None, stats, grad_loss, args, grad)
    ref = student.double()
    t_loss, t_stats = reference.sparse_fwd(ref, ids, logprobs.double(), labels, None, args)
    t_grad = torch.empty_like(ref)
    reference.sparse_bwd(
        ref, ids, logprobs.double(), labels, None, t_stats, grad_loss.double(), args, t_grad
    )
    tol = tolerance(
        "triton",
        student.dtype,
        student.shape[1],
        gpu_math=gpu_math,
        temperature=args.temperature,
        student_softcap=args.student_softcap,
    )
    assert_close(loss, t_loss, name="loss", **tol)
    assert_close(grad, t_grad, name="grad", **tol)


@pytest.mark.parametrize("sign", ["up", "mixed"])
@pytest.mark.parametrize(
    "fields",
    [{"divergence": DIVERGENCE_CODES[d], "mix": 0.0 if d in ("kl", "reverse_kl", "tvd") else 0.3}
     for d in DIVERGENCES]
    + [{"tail": TAILS.index(t)} for t in TAILS[1:]]
    + [{"temperature": 0.5, "student_softcap": 20.0}, {"temperature": 10.0}],
    ids=[*DIVERGENCES, *TAILS[1:], "T=0.5-softcap", "T=10"],
)  # fmt: skip
def test_sparse_tolerance_covers_gpu_math(monkeypatch, sign, fields):
    """The GPU tolerance model on the sparse kernels (as test_tolerance_covers_gpu_math): the
    tail bin 1 - sum q_K and the gathered bins, with every exp and division off by what a GPU
    may be off by, stay within the tolerance for Triton on a GPU."""
    approximate_gpu_math(monkeypatch, sign)
    student, ids, logprobs, labels = sparse_rows(6, 8191, 64, seed=13)
    sparse_check(student, ids, logprobs, labels, gpu_math=True, **fields)


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("inplace", [False, True], ids=["grad", "inplace"])
@pytest.mark.parametrize(
    "layout",
    [
        dict(),
        dict(width=1037),  # every row starts elsewhere modulo 4
        dict(width=1040, offset=1),  # not 16-byte aligned: ALIGN 1
        dict(k_width=13),  # ids and log-probabilities in wider rows
    ],
    ids=["contiguous", "padded", "unaligned", "strided-ids"],
)
def test_sparse_row_layouts(tail, inplace, layout):
    """The stream's row split at every layout, the gather at strided ids, and the gradient
    written over the student (the K logits are read before the row is overwritten)."""
    student, ids, logprobs, labels = sparse_rows(4, 1031, 9, seed=11, **layout)
    expected = 16 // student.element_size() if "offset" not in layout else 1
    assert sk._alignment(student, (student,)) == expected
    sparse_check(student, ids, logprobs, labels, inplace=inplace, tail=TAILS.index(tail))


@pytest.mark.parametrize(
    "width, offset", [(1031, 0), (1037, 0), (1040, 1)], ids=["contiguous", "padded", "unaligned"]
)
def test_sparse_ids_at_row_edges(width, offset):
    """Cached ids at the first and last columns of rows that start anywhere modulo 16 bytes
    (the edge tile), across a 16-byte boundary and inside the aligned part, and a student whose
    mass is nearly all in K at logits ~25: the forward must leave exactly the K columns out of
    the tail's sum wherever they lie, or the tail mass and the loss are off."""
    g = torch.Generator().manual_seed(5)
    v = 1031
    student = (torch.randn(4, width, generator=g) * 3)[:, offset : offset + v] + 20.0
    edges = torch.tensor([0, 1, 2, 3, 5, 7, 8, v - 1, v - 2, v - 3, v - 5, v - 8, 512, 513])
    ids = torch.stack([edges[torch.randperm(len(edges), generator=g)] for _ in range(4)])
    student.scatter_add_(1, ids, torch.full(ids.shape, 8.0))
    logprobs = torch.log_softmax(torch.randn(4, len(edges), generator=g), -1) - 0.01
    labels = torch.randint(0, v, (4,), generator=g)
    for tail in range(len(TAILS)):
        sparse_check(student, ids, logprobs, labels, temperature=1.0, tail=tail)


def test_sparse_out_of_range_ids_are_never_read():
    """An id outside [0, V) (no host check on a GPU) makes its row's loss and gradient NaN
    without being dereferenced (an id of 2^40 would fault); the other rows are untouched."""
    student, ids, logprobs, labels = sparse_rows(4, 37, 5, seed=12)
    labels[0] = 3
    bad = ids.clone()
    bad[1, 2], bad[2, 4] = 2**40, -1
    args = SparseKernelArgs(DIVERGENCE_CODES["jsd"], 2.0, 0.5, 0.5, 0.3, -100, 0, 1.0, 0.0)
    results = []
    for i in (ids, bad):
        loss, stats = sk.sparse_kd_loss_fwd(student, i, logprobs, labels, None, *args)
        grad = torch.empty_like(student)
        sk.sparse_kd_loss_bwd(student, i, logprobs, labels, None, stats, torch.ones(4), *args, grad)
        results.append((loss, stats, grad))
    (loss, stats, grad), (b_loss, b_stats, b_grad) = results
    assert b_loss[1:3].isnan().all() and b_stats[1:3, 2].isnan().all()
    assert b_grad[1:3].isnan().any(1).all()
    keep = [0, 3]
    assert torch.equal(b_loss[keep], loss[keep]) and torch.equal(b_grad[keep], grad[keep])
    assert torch.isfinite(loss).all()


def test_sparse_launch_meta():
    """BLOCK and num_warps from launch_config, k padded to a power of two (1 when the ids are
    not read), ALIGN from the student and the gradient only (the ids are gathered)."""
    student = torch.empty(2, 50257, dtype=torch.bfloat16)
    ids = torch.empty(2, 100, dtype=torch.int64)[:, :50]
    args = SparseKernelArgs(0, 2.0, 0.5, 0.5, 0.0, -100, 0, 1.0, 0.0)
    meta = sk.launch_meta(student, ids, None, None, args, grad=student)
    config = tk.launch_config(50257)
    assert (meta["BLOCK"], meta["num_warps"]) == (config.block, config.num_warps)
    assert (meta["KP"], meta["K"], meta["ALIGN"]) == (64, 50, 8)
    assert sk.launch_meta(student, ids, None, None, args._replace(kd_weight=0.0))["KP"] == 1
    assert sk.launch_meta(student, ids, None, None, args, grad=student[:, :-1])["ALIGN"] == 8
    assert sk.launch_meta(student, ids, None, None, args, grad=student[1:, 1:])["ALIGN"] == 1
