"""Shared test setup: which backends to test, and tolerance checks relative to the reference.

Triton kernels run on CPU tensors through Triton's interpreter, which must be switched on before
triton is first imported, hence the environment variable set here at collection time.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

if importlib.util.find_spec("triton") is not None and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastkd

# The C++ backend is part of the build: without it the suite fails, unless the build was
# skipped on purpose.
NATIVE_REQUIRED = os.environ.get("FASTKD_SKIP_NATIVE", "0") in ("", "0")


def kernel_backends() -> list:
    """Backends under test on this machine, as pytest params (unavailable ones skip, except a
    missing C++ build, which fails)."""
    status = fastkd.backends()
    params = []
    for name in ("cpu", "triton", "cuda"):
        marks = []
        if not status[name].available and not (name == "cpu" and NATIVE_REQUIRED):
            marks.append(pytest.mark.skip(reason=status[name].reason))
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def device_for(backend: str) -> torch.device:
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def assert_close(actual, truth, baseline=None, *, atol=1e-6, rtol=1e-5, name="value"):
    """|actual - truth| <= 2 |baseline - truth| + atol + rtol |truth|, elementwise.

    ``truth`` is fp64. ``baseline`` is what plain PyTorch gets at the same input precision
    (the reference backend on the same dtype): a kernel may be as wrong as that, not more.
    On failure, reports the worst element.
    """
    actual = actual.detach().double().cpu()
    truth = truth.detach().double().cpu()
    assert actual.shape == truth.shape, f"{name}: shape {actual.shape} != {truth.shape}"
    same_inf = torch.isinf(truth) & (actual == truth)
    allowed = atol + rtol * truth.abs()
    if baseline is not None:
        allowed = allowed + 2 * (baseline.detach().double().cpu() - truth).abs()
    err = torch.where(same_inf, 0.0, (actual - truth).abs())
    bad = ~(err <= allowed)  # NaN counts as bad
    if bad.any():
        excess = torch.where(bad, err - allowed, 0.0).nan_to_num(nan=float("inf"))
        i = int(excess.reshape(-1).argmax())
        idx = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), truth.shape))
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements out of tolerance; worst at {idx}: "
            f"actual {actual.reshape(-1)[i].item():.9g}, truth {truth.reshape(-1)[i].item():.9g}, "
            f"allowed error {allowed.reshape(-1)[i].item():.3g}"
        )
