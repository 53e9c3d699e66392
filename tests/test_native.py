"""The native kernels' build-level contracts (docs/design.md §3, §6): the divergence codes and tail
modes the C++ compiled are fastkd._options', the element-math headers are plain C++, the CUDA
kernels compile for sm_90 without spills, reading and writing rows with 128-bit accesses, and the
sparse ops' C++ checks and id guard (docs/design.md §11), which the Python layer's checks hide."""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from fastkd._options import DIVERGENCE_CODES, DIVERGENCES, TAILS, SparseKernelArgs

CSRC = Path(__file__).resolve().parents[1] / "csrc"


def _native():
    if os.environ.get("FASTKD_SKIP_NATIVE", "0") not in ("", "0"):
        pytest.skip("FASTKD_SKIP_NATIVE is set: no fastkd._C")
    importlib.import_module("fastkd._ops")  # the schemas of the ops fastkd._C implements
    return importlib.import_module("fastkd._C")


def test_divergence_codes_match_python():
    codes = _native().divergence_codes()
    assert codes == DIVERGENCE_CODES
    assert sorted(codes, key=codes.get) == list(DIVERGENCES)


def test_tail_codes_match_python():
    codes = _native().tail_codes()
    assert sorted(codes, key=codes.get) == list(TAILS)
    assert list(codes.values()) == sorted(codes.values()) == list(range(len(TAILS)))


def test_kernel_headers_are_plain_cpp(tmp_path):
    """kd_params.h (with kd_math.h) compiles with no torch or CUDA header in reach, so nvcc can
    build the CUDA kernels against it where torch has no CUDA."""
    cxx = shutil.which(os.environ.get("CXX", "c++"))
    if cxx is None:
        pytest.skip("no C++ compiler on PATH")
    source = tmp_path / "headers.cpp"
    source.write_text('#include "kd_params.h"\n')
    subprocess.run(
        [cxx, "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", f"-I{CSRC}", source],
        check=True,
    )


def _cuobjdump() -> str | None:
    try:
        triton = importlib.import_module("triton")
    except ImportError:
        return shutil.which("cuobjdump")
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.is_file() else shutil.which("cuobjdump")


@pytest.fixture(scope="module")
def sm90_build(tmp_path_factory):
    """(ptxas report, {kernel: SASS}) of csrc/cuda/kd_loss.cu compiled for sm_90."""
    nvcc, cuobjdump = shutil.which("nvcc"), _cuobjdump()
    if nvcc is None or cuobjdump is None:
        pytest.skip("needs nvcc and cuobjdump (shipped in the triton wheel)")
    cubin = tmp_path_factory.mktemp("cuda") / "kd_loss.cubin"
    source = CSRC / "cuda" / "kd_loss.cu"
    flags = ["-std=c++17", "-arch=sm_90", "-cubin", "-Xptxas", "-v", f"-I{CSRC}"]
    build = subprocess.run(
        [nvcc, *flags, "-o", cubin, source],
        check=True,
        capture_output=True,
        text=True,
    )
    sass = subprocess.run(
        [cuobjdump, "-sass", cubin], check=True, capture_output=True, text=True
    ).stdout
    kernels = {}
    for block in sass.split("Function : ")[1:]:
        name, _, body = block.partition("\n")
        kernels[name.strip()] = body
    assert len(kernels) == 2 * 3 * len(DIVERGENCES), sorted(kernels)
    return build.stdout + build.stderr, kernels


def _accesses(body: str, op: str) -> set[str]:
    return set(re.findall(rf"\b{op}(?:\.[A-Z0-9]+)*", body))


@pytest.mark.slow
def test_cuda_kernels_do_not_spill(sm90_build):
    report, _ = sm90_build
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    assert len(spills) == 2 * 3 * len(DIVERGENCES)
    assert all(stores == loads == "0" for stores, loads in spills), report


@pytest.mark.slow
def test_cuda_rows_move_in_128_bit_accesses(sm90_build):
    """Both kernels load rows with LDG.E.128 (.CONSTANT in the forward, which only reads); the
    backward writes the gradient with STG.E.128,
    beside the scalar stores of a row's unaligned ends (32-bit fp32 or 16-bit bf16/fp16) and
    nothing between (no vector store split into 32- or 64-bit ones)."""
    _, kernels = sm90_build
    for name, body in kernels.items():
        assert any(a.startswith("LDG.E.128") for a in _accesses(body, "LDG")), name
        if "kd_bwd_kernel" in name:
            scalar = "STG.E" if "kd_bwd_kernelIf" in name else "STG.E.U16"
            assert _accesses(body, "STG") == {"STG.E.128", scalar}, name


# --- the sparse ops' C++ checks (csrc/sparse_kd_loss_op.h) and id guard -----------------------

SPARSE_ARGS = SparseKernelArgs(
    divergence=DIVERGENCE_CODES["kl"],
    temperature=2.0,
    kd_weight=0.5,
    ce_weight=0.5,
    mix=0.0,
    ignore_index=-100,
    tail=TAILS.index("bucket"),
    student_scale=1.0,
    student_softcap=0.0,
)


def _sparse_inputs(n=3, v=10, k=4, dtype=torch.float32):
    """Student logits [n, v], k distinct ids per row with their log-probabilities, labels."""
    g = torch.Generator().manual_seed(0)
    student = torch.randn(n, v, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    logprobs = torch.log_softmax(torch.randn(n, v, generator=g), -1).gather(1, ids)
    labels = torch.randint(0, v, (n,), generator=g)
    return student, ids, logprobs, labels


def _sparse_fwd(student, ids, logprobs, labels, args=SPARSE_ARGS):
    _native()
    return torch.ops.fastkd.sparse_kd_loss_fwd(student, ids, logprobs, labels, None, *args)


def _sparse_bwd(student, ids, logprobs, labels, stats, grad, args=SPARSE_ARGS):
    grad_loss = torch.ones(student.shape[0])
    torch.ops.fastkd.sparse_kd_loss_bwd(
        student, ids, logprobs, labels, None, stats, grad_loss, *args, grad
    )


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (dict(ids=lambda t: t.int()), "ids must be int64, got Int"),
        (dict(ids=lambda t: t[:2]), r"ids must have shape \[N, k\] with the student's N = 3 rows"),
        (dict(ids=lambda t: t[0]), r"ids must have shape \[N, k\]"),
        (dict(ids=lambda t: t[:, :0], logprobs=lambda t: t[:, :0]), r"k in \[1, V = 10\].*k = 0"),
        (
            dict(ids=lambda t: torch.arange(11).repeat(3, 1), logprobs=lambda t: t[:, :1] - t[0]),
            r"k in \[1, V = 10\].*k = 11",
        ),
        (dict(ids=lambda t: t.repeat(1, 2)[:, ::2]), "ids must have a contiguous last dimension"),
        (dict(logprobs=lambda t: t.double()), "logprobs must be float32, got Double"),
        (dict(logprobs=lambda t: t.bfloat16()), "logprobs must be float32, got BFloat16"),
        (dict(logprobs=lambda t: t[:, :3]), r"logprobs must have the shape \[3, 4\] of ids"),
        (dict(student=lambda t: t.double()), "student must be float32, bfloat16 or float16"),
        (dict(labels=lambda t: t.int()), "labels must be Long"),
        (dict(args=dict(tail=3)), r"tail code must be in \[0, 3\)"),
        (dict(args=dict(divergence=6)), r"divergence code must be in \[0, 6\)"),
        (dict(args=dict(temperature=0.0)), "temperature must be finite and > 0"),
        (dict(args=dict(divergence=DIVERGENCE_CODES["jsd"], mix=1.0)), r"mix .* in \(0, 1\)"),
        (dict(args=dict(student_softcap=-1.0)), r"softcaps must be >= 0 .*got -1 and 0"),
    ],
)
def test_sparse_op_checks_name_the_argument(change, match):
    """ids, logprobs and the scalars are checked in C++ with a message naming the argument (the
    device check is the dense ops' shared helper; a CPU-only machine cannot exercise it)."""
    student, ids, logprobs, labels = _sparse_inputs()
    tensors = dict(student=student, ids=ids, logprobs=logprobs, labels=labels)
    for name, f in change.items():
        if name != "args":
            tensors[name] = f(tensors[name])
    args = SPARSE_ARGS._replace(**change.get("args", {}))
    with pytest.raises(RuntimeError, match=match):
        _sparse_fwd(*tensors.values(), args)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (dict(stats=lambda t: t[:, :2]), r"stats must be a contiguous float32 tensor of shape"),
        (dict(stats=lambda t: t.double()), r"stats must be a contiguous float32 tensor"),
        (dict(grad=lambda t: t.bfloat16()), "grad must have the student's dtype"),
        (dict(grad=lambda t: t[:, :9]), "grad must have the student's shape"),
    ],
)
def test_sparse_bwd_checks_name_the_argument(change, match):
    student, ids, logprobs, labels = _sparse_inputs()
    _, stats = _sparse_fwd(student, ids, logprobs, labels)
    tensors = dict(stats=stats, grad=torch.empty_like(student))
    for name, f in change.items():
        tensors[name] = f(tensors[name])
    with pytest.raises(RuntimeError, match=match):
        _sparse_bwd(student, ids, logprobs, labels, tensors["stats"], tensors["grad"])


@pytest.mark.parametrize("tail", TAILS)
def test_sparse_id_out_of_range_is_a_nan_row_never_read(tail):
    """The op does not check ids (the Python layer does, on CPU tensors): a row with an id
    outside [0, V) gets a NaN loss and a NaN gradient (0 at its -inf logits), without the id
    being dereferenced; the other rows are unchanged. With kd_weight 0 ids are not read."""
    student, ids, logprobs, labels = _sparse_inputs(n=4, v=4096, k=8)
    student[1, 5] = -torch.inf
    args = SPARSE_ARGS._replace(tail=TAILS.index(tail))
    loss, stats = _sparse_fwd(student, ids, logprobs, labels, args)
    grad = torch.empty_like(student)
    _sparse_bwd(student, ids, logprobs, labels, stats, grad, args)
    bad = ids.clone()
    bad[1, 3], bad[2, 0] = 1 << 60, -(1 << 60)  # far outside the row: a read would fault
    bad_loss, bad_stats = _sparse_fwd(student, bad, logprobs, labels, args)
    bad_grad = torch.empty_like(student)
    _sparse_bwd(student, bad, logprobs, labels, bad_stats, bad_grad, args)
    assert bad_loss[1:3].isnan().all() and torch.equal(bad_loss[[0, 3]], loss[[0, 3]])
    assert torch.equal(bad_grad[[0, 3]], grad[[0, 3]])
    assert bad_grad[2].isnan().all() and bad_grad[1, 5] == 0
    assert bad_grad[1, :5].isnan().all() and bad_grad[1, 6:].isnan().all()
    ce_only = SPARSE_ARGS._replace(kd_weight=0.0)
    assert torch.equal(
        _sparse_fwd(student, bad, logprobs, labels, ce_only)[0],
        _sparse_fwd(student, ids, logprobs, labels, ce_only)[0],
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sparse_fwd_bwd_in_place_equals_fwd_then_bwd(dtype):
    """fwd_bwd writing the gradient over the student itself (the K logits are gathered before
    the row is overwritten) gives fwd's loss and stats and bwd's gradient, bit for bit, on rows
    of several tiles."""
    student, ids, logprobs, labels = _sparse_inputs(n=5, v=5000, k=64, dtype=dtype)
    ids[0, :3] = torch.tensor([0, 4999, 2048])  # the first, last and a tile's first column
    loss, stats = _sparse_fwd(student, ids, logprobs, labels)
    grad = torch.empty_like(student)
    _sparse_bwd(student, ids, logprobs, labels, stats, grad)
    x = student.clone()
    fused = torch.ops.fastkd.sparse_kd_loss_fwd_bwd(
        x, ids, logprobs, labels, None, torch.ones(5), *SPARSE_ARGS, x
    )
    assert torch.equal(fused[0], loss) and torch.equal(fused[1], stats)
    assert torch.equal(x, grad)
