"""Backend discovery and per-call selection.

Backends: ``triton`` (Triton kernels in ``fastkd.kernels``; CUDA tensors, or CPU tensors through
Triton's interpreter when ``TRITON_INTERPRET=1``), ``cuda`` and ``cpu`` (the C++ extension
``fastkd._C``), ``reference`` (plain PyTorch, always available). A call picks, in order: the
``backend=`` argument, the ``FASTKD_BACKEND`` environment variable, then the default for the
tensors' device. A missing or broken native build never breaks ``import fastkd``: it only makes
the native backends unavailable, and ``backends()`` says why.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from types import ModuleType
from typing import NamedTuple

import torch

from fastkd import _ops

BACKENDS = ("triton", "cuda", "cpu", "reference")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class BackendStatus(NamedTuple):
    available: bool
    reason: str  # why not, or what it runs on when available


@functools.cache
def _native() -> tuple[ModuleType | None, str]:
    """Import the C++ extension once; keep the error text if it is not there."""
    try:
        module = importlib.import_module("fastkd._C")
    except ImportError as exc:
        hint = (
            "native build skipped (FASTKD_SKIP_NATIVE is set)"
            if os.environ.get("FASTKD_SKIP_NATIVE")
            else "reinstall with `pip install --no-build-isolation -e .` to build it"
        )
        return None, f"fastkd._C is not importable ({exc}); {hint}"
    return module, ""


def native_module() -> ModuleType | None:
    return _native()[0]


def interpreting() -> bool:
    """True when Triton kernels run through Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _triton_import_error() -> str:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    try:
        importlib.import_module("triton")
    except Exception as exc:  # a broken triton install must not break fastkd
        return f"triton failed to import: {exc}"
    return ""


def _status(name: str) -> BackendStatus:
    if name == "reference":
        return BackendStatus(True, "pure PyTorch, any device")
    if name == "triton":
        if err := _triton_import_error():
            return BackendStatus(False, err)
        if torch.cuda.is_available():
            return BackendStatus(True, "CUDA tensors")
        if interpreting():
            return BackendStatus(
                True, "CPU tensors through Triton's interpreter (TRITON_INTERPRET=1)"
            )
        return BackendStatus(False, "no CUDA device, and TRITON_INTERPRET=1 is not set")
    module, err = _native()
    if module is None:
        return BackendStatus(False, err)
    if name == "cpu":
        return BackendStatus(True, module.build_info())
    if not module.has_cuda():
        return BackendStatus(
            False, "fastkd._C was built without CUDA (no CUDA toolkit or CPU-only torch)"
        )
    if not torch.cuda.is_available():
        return BackendStatus(False, "no CUDA device")
    return BackendStatus(True, module.build_info())


def backends() -> dict[str, BackendStatus]:
    """Every backend with whether it is usable here and, if not, why."""
    return {name: _status(name) for name in BACKENDS}


@torch.compiler.assume_constant_result  # runs once while tracing; the graph keeps the name
def select_backend(requested: str | None, device: torch.device, dtype: torch.dtype) -> str:
    """The backend for one call on tensors of ``device`` and ``dtype``, loaded and ready, or a
    clear error."""
    name = _choose(requested, device, dtype)
    if name != "reference":
        _ops.load(name)
    return name


def _choose(requested: str | None, device: torch.device, dtype: torch.dtype) -> str:
    source = "backend"
    if requested is None and os.environ.get("FASTKD_BACKEND"):
        requested, source = os.environ["FASTKD_BACKEND"], "FASTKD_BACKEND"
    if requested is None:
        if dtype not in KERNEL_DTYPES:
            return "reference"  # fp64 ground truth
        if device.type == "cuda":
            return "triton" if _status("triton").available else "reference"
        if device.type == "cpu" and _status("cpu").available:
            return "cpu"
        return "reference"

    if requested not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {requested!r}")
    if requested == "reference":
        return requested
    if dtype not in KERNEL_DTYPES:
        raise TypeError(
            f"{source}={requested!r} computes on float32/bfloat16/float16 logits, got {dtype}; "
            "use backend='reference' for float64"
        )
    status = _status(requested)
    if not status.available:
        raise RuntimeError(f"{source}={requested!r} is not available: {status.reason}")
    wanted = {"cpu": "cpu", "cuda": "cuda"}.get(requested)
    if requested == "triton":
        wanted = "cpu" if interpreting() and device.type == "cpu" else "cuda"
    if device.type != wanted:
        if requested == "triton" and device.type == "cpu":
            raise RuntimeError(
                "backend='triton' got CPU tensors: set TRITON_INTERPRET=1 before importing "
                "fastkd to run the Triton kernels through Triton's interpreter, or use "
                "backend='cpu'"
            )
        raise RuntimeError(f"{source}={requested!r} runs on {wanted} tensors, got {device.type}")
    return requested
