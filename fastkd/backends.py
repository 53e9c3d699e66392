"""Backends: one object per implementation of the op contract, and per-call selection.

Every backend implements ``Backend`` (docs/design.md §4): ``name``, ``status()``, ``load()``,
``check_device()`` and the fwd/bwd of the op contract (docs/design.md §2). ``triton`` runs the
Triton kernels in ``fastkd.kernels`` (CUDA tensors, or CPU tensors through Triton's interpreter
when ``TRITON_INTERPRET=1``), ``cuda`` and ``cpu`` the C++ extension ``fastkd._C``,
``reference`` plain PyTorch (always available). A call picks, in order: the ``backend=``
argument, the ``FASTKD_BACKEND`` environment variable, then the default for the tensors' device.
A missing or broken native build never breaks ``import fastkd``: it only makes the native
backends unavailable, and ``backends()`` says why.
"""

from __future__ import annotations

import abc
import functools
import importlib
import importlib.util
import os
from types import ModuleType
from typing import NamedTuple

import torch

from fastkd import _ops, reference
from fastkd._options import KernelArgs, SparseKernelArgs

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class BackendStatus(NamedTuple):
    available: bool
    reason: str  # why not, or what it runs on when available


class Backend(abc.ABC):
    """One implementation of ``kd_loss_fwd`` / ``kd_loss_bwd`` (docs/design.md §2)."""

    name: str
    dtypes: tuple[torch.dtype, ...]  # of the logits it computes on
    has_sparse: bool = True  # implements the sparse ops (docs/design.md §11)

    @abc.abstractmethod
    def status(self) -> BackendStatus:
        """Whether it is usable here and, if not, why."""

    @abc.abstractmethod
    def load(self) -> None:
        """Make ``fwd`` and ``bwd`` callable (cheap after the first call)."""

    @abc.abstractmethod
    def check_device(self, device: torch.device, source: str) -> None:
        """Raise a RuntimeError, naming ``source``, unless it runs on tensors of ``device``."""

    @abc.abstractmethod
    def fwd(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        labels: torch.Tensor | None,
        weights: torch.Tensor | None,
        args: KernelArgs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss [N], stats [N, 4]) of [N, Vs] student and [N, Vt] teacher rows."""

    @abc.abstractmethod
    def bwd(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        labels: torch.Tensor | None,
        weights: torch.Tensor | None,
        stats: torch.Tensor,
        grad_loss: torch.Tensor,
        args: KernelArgs,
        grad: torch.Tensor,
    ) -> None:
        """Write grad_loss[i] * d loss[i] / d student[i] into ``grad`` (may be ``student``)."""

    def fwd_bwd(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        labels: torch.Tensor | None,
        weights: torch.Tensor | None,
        grad_loss: torch.Tensor,
        args: KernelArgs,
        grad: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``fwd``, then ``bwd`` with its stats: (loss, stats), and the gradient written into
        ``grad`` (may be ``student``). A backend with a fused kernel overrides it."""
        loss, stats = self.fwd(student, teacher, labels, weights, args)
        self.bwd(student, teacher, labels, weights, stats, grad_loss, args, grad)
        return loss, stats

    # The sparse ops (a cached top-k teacher: ids and log-probabilities instead of logits).

    def sparse_fwd(
        self,
        student: torch.Tensor,
        ids: torch.Tensor,
        logprobs: torch.Tensor,
        labels: torch.Tensor | None,
        weights: torch.Tensor | None,
        args: SparseKernelArgs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss [N], stats [N, 3]) of [N, V] student rows against [N, k] cached ids and
        log-probabilities (docs/design.md §11)."""
        raise NotImplementedError(self.name)

    def sparse_bwd(
        self,
        student: torch.Tensor,
        ids: torch.Tensor,
        logprobs: torch.Tensor,
        labels: torch.Tensor | None,
        weights: torch.Tensor | None,
        stats: torch.Tensor,
        grad_loss: torch.Tensor,
        args: SparseKernelArgs,
        grad: torch.Tensor,
    ) -> None:
        """Write grad_loss[i] * d loss[i] / d student[i] into ``grad`` (may be ``student``)."""
        raise NotImplementedError(self.name)

    def sparse_fwd_bwd(
        self,
        student: torch.Tensor,
        ids: torch.Tensor,
        logprobs: torch.Tensor,
        labels: torch.Tensor | None,
        weights: torch.Tensor | None,
        grad_loss: torch.Tensor,
        args: SparseKernelArgs,
        grad: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``sparse_fwd``, then ``sparse_bwd`` with its stats, as ``fwd_bwd``."""
        loss, stats = self.sparse_fwd(student, ids, logprobs, labels, weights, args)
        self.sparse_bwd(student, ids, logprobs, labels, weights, stats, grad_loss, args, grad)
        return loss, stats


class RowKernel(NamedTuple):
    """The row ops of one loss call: a backend's dense ops (the teacher as logits) or its sparse
    ops (a cached teacher's ids and log-probabilities, with ``SparseKernelArgs``), bound to the
    call's kernel arguments. ``teacher`` is a tuple of tensors: ``(logits,)`` or
    ``(ids, logprobs)``, so one autograd Function and one fused chunk loop serve both."""

    backend: Backend
    args: KernelArgs | SparseKernelArgs

    @property
    def sparse(self) -> bool:
        return isinstance(self.args, SparseKernelArgs)

    @property
    def lse_column(self) -> int:
        """The stats column holding lse(x) at T = 1 (the CE's)."""
        return 1 if self.sparse else 2

    def fwd(self, student, teacher: tuple, labels, weights):
        op = self.backend.sparse_fwd if self.sparse else self.backend.fwd
        return op(student, *teacher, labels, weights, self.args)

    def bwd(self, student, teacher: tuple, labels, weights, stats, grad_loss, grad) -> None:
        op = self.backend.sparse_bwd if self.sparse else self.backend.bwd
        op(student, *teacher, labels, weights, stats, grad_loss, self.args, grad)

    def fwd_bwd(self, student, teacher: tuple, labels, weights, grad_loss, grad):
        op = self.backend.sparse_fwd_bwd if self.sparse else self.backend.fwd_bwd
        return op(student, *teacher, labels, weights, grad_loss, self.args, grad)


class _OpBackend(Backend):
    """A backend whose fwd/bwd are the torch.library ops ``fastkd::{prefix}kd_loss_*``."""

    prefix: str
    device_type: str
    dtypes = KERNEL_DTYPES

    @property
    def ops(self) -> _ops.KernelOps:
        return _ops.kernel_ops(self.prefix)

    def check_device(self, device: torch.device, source: str) -> None:
        if device.type != self.device_type:
            raise RuntimeError(
                f"{source}={self.name!r} runs on {self.device_type} tensors, got {device.type}"
            )

    def fwd(self, student, teacher, labels, weights, args):
        return self.ops.fwd(student, teacher, labels, weights, *args)

    def bwd(self, student, teacher, labels, weights, stats, grad_loss, args, grad):
        self.ops.bwd(student, teacher, labels, weights, stats, grad_loss, *args, grad)

    def sparse_fwd(self, student, ids, logprobs, labels, weights, args):
        return self.ops.sparse_fwd(student, ids, logprobs, labels, weights, *args)

    def sparse_bwd(self, student, ids, logprobs, labels, weights, stats, grad_loss, args, grad):
        self.ops.sparse_bwd(student, ids, logprobs, labels, weights, stats, grad_loss, *args, grad)


class TritonBackend(_OpBackend):
    name, prefix, device_type = "triton", "triton_", "cuda"

    def status(self) -> BackendStatus:
        if err := _triton_import_error():
            return BackendStatus(False, err)
        if torch.cuda.is_available():
            return BackendStatus(True, "CUDA tensors")
        if interpreting():
            return BackendStatus(
                True, "CPU tensors through Triton's interpreter (TRITON_INTERPRET=1)"
            )
        return BackendStatus(False, "no CUDA device, and TRITON_INTERPRET=1 is not set")

    def load(self) -> None:
        _ops.register_triton()

    def check_device(self, device: torch.device, source: str) -> None:
        if device.type == "cpu" and interpreting():
            return
        if device.type == "cpu":
            raise RuntimeError(
                "backend='triton' got CPU tensors: set TRITON_INTERPRET=1 before importing "
                "fastkd to run the Triton kernels through Triton's interpreter, or use "
                "backend='cpu'"
            )
        super().check_device(device, source)


class NativeBackend(_OpBackend):
    """The C++ extension's ops, which dispatch on the tensors' device (``cpu`` and ``cuda``)."""

    prefix = ""

    def __init__(self, device_type: str) -> None:
        self.name = self.device_type = device_type
        self.has_sparse = device_type == "cpu"  # no CUDA C++ sparse kernels: triton has them

    def status(self) -> BackendStatus:
        module, err = _native()
        if module is None:
            return BackendStatus(False, err)
        if self.device_type == "cuda":
            if not module.has_cuda():
                return BackendStatus(
                    False, "fastkd._C was built without CUDA (no CUDA toolkit or CPU-only torch)"
                )
            if not torch.cuda.is_available():
                return BackendStatus(False, "no CUDA device")
        return BackendStatus(True, module.build_info())

    def load(self) -> None:
        importlib.import_module("fastkd._C")  # its static initialisers register the kernels

    def fwd_bwd(self, student, teacher, labels, weights, grad_loss, args, grad):
        if self.device_type != "cpu":  # the CPU kernels alone have the fused op
            return super().fwd_bwd(student, teacher, labels, weights, grad_loss, args, grad)
        op = torch.ops.fastkd.kd_loss_fwd_bwd
        return op(student, teacher, labels, weights, grad_loss, *args, grad)

    def sparse_fwd_bwd(self, student, ids, logprobs, labels, weights, grad_loss, args, grad):
        op = torch.ops.fastkd.sparse_kd_loss_fwd_bwd
        return op(student, ids, logprobs, labels, weights, grad_loss, *args, grad)


class ReferenceBackend(Backend):
    """``fastkd.reference``: plain PyTorch on any device, fp64 inputs in fp64."""

    name = "reference"
    dtypes = (*KERNEL_DTYPES, torch.float64)

    def status(self) -> BackendStatus:
        return BackendStatus(True, "pure PyTorch, any device")

    def load(self) -> None:
        pass

    def check_device(self, device: torch.device, source: str) -> None:
        pass

    def fwd(self, student, teacher, labels, weights, args):
        return reference.kd_loss_fwd(student, teacher, labels, weights, args)

    def bwd(self, student, teacher, labels, weights, stats, grad_loss, args, grad):
        reference.kd_loss_bwd(student, teacher, labels, weights, stats, grad_loss, args, grad)

    def sparse_fwd(self, student, ids, logprobs, labels, weights, args):
        return reference.sparse_kd_loss_fwd(student, ids, logprobs, labels, weights, args)

    def sparse_bwd(self, student, ids, logprobs, labels, weights, stats, grad_loss, args, grad):
        reference.sparse_kd_loss_bwd(
            student, ids, logprobs, labels, weights, stats, grad_loss, args, grad
        )


_REGISTRY: dict[str, Backend] = {
    b.name: b
    for b in (TritonBackend(), NativeBackend("cuda"), NativeBackend("cpu"), ReferenceBackend())
}
BACKENDS = tuple(_REGISTRY)


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


def backends() -> dict[str, BackendStatus]:
    """Every backend with whether it is usable here and, if not, why."""
    return {name: backend.status() for name, backend in _REGISTRY.items()}


def get_backend(name: str) -> Backend:
    """The backend object of a name that ``select_backend`` returned."""
    return _REGISTRY[name]


def check_backend_name(backend: str | None) -> None:
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")


@torch.compiler.assume_constant_result  # runs once while tracing; the graph keeps the name
def select_backend(
    requested: str | None, device: torch.device, dtype: torch.dtype, sparse: bool = False
) -> str:
    """The name of the backend for one call on tensors of ``device`` and ``dtype`` (of the
    sparse ops with ``sparse``), loaded and ready, or a clear error."""
    backend = _choose(requested, device, dtype, sparse)
    backend.load()
    return backend.name


def _choose(
    requested: str | None, device: torch.device, dtype: torch.dtype, sparse: bool
) -> Backend:
    source = "backend"
    if requested is None and os.environ.get("FASTKD_BACKEND"):
        requested, source = os.environ["FASTKD_BACKEND"], "FASTKD_BACKEND"
    if requested is None:
        return _REGISTRY[_default(device, dtype)]
    if requested not in _REGISTRY:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {requested!r}")
    backend = _REGISTRY[requested]
    if sparse and not backend.has_sparse:
        with_sparse = tuple(name for name, b in _REGISTRY.items() if b.has_sparse)
        raise ValueError(
            f"{source}={requested!r} has no sparse (cached top-k teacher) kernels; the sparse "
            f"losses run on {with_sparse}"
        )
    if dtype not in backend.dtypes:
        raise TypeError(
            f"{source}={requested!r} computes on float32/bfloat16/float16 logits, got {dtype}; "
            "use backend='reference' for float64"
        )
    status = backend.status()
    if not status.available:
        raise RuntimeError(f"{source}={requested!r} is not available: {status.reason}")
    backend.check_device(device, source)
    return backend


def _default(device: torch.device, dtype: torch.dtype) -> str:
    if dtype in KERNEL_DTYPES:
        if device.type == "cuda" and _REGISTRY["triton"].status().available:
            return "triton"
        if device.type == "cpu" and _REGISTRY["cpu"].status().available:
            return "cpu"
    return "reference"  # fp64 ground truth, or no kernel for the device
