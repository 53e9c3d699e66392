"""The native kernels' build-level contracts (docs/design.md §3, §6): the divergence codes the C++
compiled are fastkd._options', the element-math headers are plain C++, and the CUDA kernels
compile for sm_90 without spills, reading and writing rows with 128-bit accesses."""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from fastkd._options import DIVERGENCE_CODES, DIVERGENCES

CSRC = Path(__file__).resolve().parents[1] / "csrc"


def test_divergence_codes_match_python():
    if os.environ.get("FASTKD_SKIP_NATIVE", "0") not in ("", "0"):
        pytest.skip("FASTKD_SKIP_NATIVE is set: no fastkd._C")
    codes = importlib.import_module("fastkd._C").divergence_codes()
    assert codes == DIVERGENCE_CODES
    assert sorted(codes, key=codes.get) == list(DIVERGENCES)


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
