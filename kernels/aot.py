"""Ahead-of-time compile of the Triton kernels for GPUs this machine need not have.

Compiles every ``@triton.jit`` kernel of ``fastkd.kernels.kd_loss`` and
``fastkd.kernels.sparse_kd_loss`` for sm_80 and sm_90 with exactly what its launcher would
launch: the arguments come from the launcher's own helpers (``fwd_args``/``bwd_args``,
``launch_meta``, hence ``launch_config``), and Triton's own binder
turns them into the specialisation (constexprs, 16-divisibility of pointers and integers) that
``kernel[grid](...)`` would compile on a GPU. Each compiled kernel's registers, local memory
(spills), shared memory and 128-bit global loads/stores (from its SASS) are recorded
(docs/design.md §6).

    python -m fastkd.kernels.aot                 # the full matrix -> bench/results/aot/
    python -m fastkd.kernels.aot --quick --out x.json
    python -m fastkd.kernels.aot --quick --ops sparse_kd_loss --out x.json   # one op's kernels

Needs triton's CUDA backend (ptxas and cuobjdump ship in the wheel), not a GPU, and
TRITON_INTERPRET unset (under the interpreter ``@triton.jit`` gives no compilable kernel).
Exits non-zero if a kernel fails to compile or spills.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from fastkd._options import DIVERGENCE_CODES, DIVERGENCES, TAILS, KernelArgs, SparseKernelArgs
from fastkd.kernels import kd_loss, sparse_kd_loss

ARCHS = (80, 90)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
VOCABS = (32000, 50257, 128256, 151936, 256000)  # Llama 2, GPT-2, Llama 3, Qwen 2, Gemma
# Flag settings that change the compiled code: name -> (kd_weight, ce_weight, labels, softcap)
SETTINGS = {
    "kd+ce": (0.5, 0.5, True, 0.0),
    "kd": (1.0, 0.0, False, 0.0),
    "ce": (0.0, 1.0, True, 0.0),  # no KD term: the divergence does not matter
    "kd+ce+softcap": (0.5, 0.5, True, 30.0),
}
# The test's reduced matrix: default and CE-only flags, the awkward vocabulary (vocabularies
# that are multiples of 16 specialise differently but compile to the same resources).
QUICK_SETTINGS = ("kd+ce", "ce")
QUICK_VOCABS = (50257,)
# The sparse loss (a cached top-k teacher): the tail modes compiled per setting. Every mode with
# the default flags; the others change only the transform (softcap), the labels' load or drop
# the KD term, which no mode touches, so the bucket mode (the most code) stands for them.
# The quick matrix takes the bucket mode alone.
SPARSE_TAILS = {"kd+ce": TAILS, "kd": ("bucket",), "ce": ("bucket",), "kd+ce+softcap": ("bucket",)}
SPARSE_K = 64  # the cache's default top-k (fastkd cache-teacher --top-k 64)
OPS = ("kd_loss", "sparse_kd_loss")

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results" / "aot"
_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


@dataclasses.dataclass(frozen=True)
class Case:
    arch: int
    op: str  # one of OPS
    kernel: str  # "fwd" or "bwd"
    dtype: str
    divergence: str
    tail: str | None  # the sparse loss's tail mode; None for kd_loss
    setting: str
    vocab: int


def cases(quick: bool = False, ops: tuple[str, ...] = OPS) -> Iterator[Case]:
    """The compile matrix: both kernels of each op in ``ops``, every target, dtype and
    divergence, the flag settings, the sparse loss's tail modes and the vocabularies (the
    launchers' configurations follow from those)."""
    for arch in ARCHS:
        for op in ops:
            for kernel in ("fwd", "bwd"):
                for dtype in DTYPES:
                    for setting in QUICK_SETTINGS if quick else SETTINGS:
                        divergences = ("kl",) if setting == "ce" else DIVERGENCES
                        tails = (None,)
                        if op == "sparse_kd_loss":
                            tails = ("bucket",) if quick else SPARSE_TAILS[setting]
                        for divergence in divergences:
                            for tail in tails:
                                for vocab in QUICK_VOCABS if quick else VOCABS:
                                    yield Case(
                                        arch, op, kernel, dtype, divergence, tail, setting, vocab
                                    )


def launch(case: Case) -> tuple[JITFunction, tuple, dict]:
    """The kernel, positional and keyword arguments its launcher would pass for two rows of
    ``case`` (CPU tensors stand in for CUDA ones: only their dtypes, strides and 16-byte
    alignment reach the compiler)."""
    if case.op == "sparse_kd_loss":
        return _launch_sparse(case)
    kd_w, ce_w, has_labels, cap = SETTINGS[case.setting]
    mix = 0.0 if case.divergence in ("kl", "reverse_kl", "tvd") else 0.3
    args = KernelArgs(
        DIVERGENCE_CODES[case.divergence], 2.0, kd_w, ce_w, mix, -100, case.vocab, 1.0, cap, 1.0,
        cap,
    )  # fmt: skip
    dtype = DTYPES[case.dtype]
    student = torch.empty(2, case.vocab, dtype=dtype)
    teacher = torch.empty_like(student)
    labels = torch.zeros(2, dtype=torch.int64) if has_labels else None
    stats = torch.empty(2, 4)
    loss = torch.empty(2)
    if case.kernel == "fwd":
        positional = kd_loss.fwd_args(student, teacher, labels, None, loss, stats)
        meta = kd_loss.launch_meta(student, teacher, labels, None, args)
        return kd_loss._kd_fwd_kernel, positional, meta
    grad = torch.empty_like(student)
    positional = kd_loss.bwd_args(student, teacher, labels, None, stats, loss, grad)
    meta = kd_loss.launch_meta(student, teacher, labels, None, args, grad)
    return kd_loss._kd_bwd_kernel, positional, meta


def _launch_sparse(case: Case) -> tuple[JITFunction, tuple, dict]:
    """``launch`` for the sparse loss: SPARSE_K cached ids and log-probabilities per row."""
    kd_w, ce_w, has_labels, cap = SETTINGS[case.setting]
    mix = 0.0 if case.divergence in ("kl", "reverse_kl", "tvd") else 0.3
    args = SparseKernelArgs(
        DIVERGENCE_CODES[case.divergence], 2.0, kd_w, ce_w, mix, -100, TAILS.index(case.tail),
        1.0, cap,
    )  # fmt: skip
    student = torch.empty(2, case.vocab, dtype=DTYPES[case.dtype])
    ids = torch.zeros(2, SPARSE_K, dtype=torch.int64)
    logprobs = torch.empty(2, SPARSE_K)
    labels = torch.zeros(2, dtype=torch.int64) if has_labels else None
    stats = torch.empty(2, 3)
    loss = torch.empty(2)
    sk = sparse_kd_loss
    if case.kernel == "fwd":
        positional = sk.fwd_args(student, ids, logprobs, labels, None, loss, stats)
        meta = sk.launch_meta(student, ids, labels, None, args)
        return sk._sparse_fwd_kernel, positional, meta
    grad = torch.empty_like(student)
    positional = sk.bwd_args(student, ids, logprobs, labels, None, stats, loss, grad)
    meta = sk.launch_meta(student, ids, labels, None, args, grad)
    return sk._sparse_bwd_kernel, positional, meta


def specialise(kernel: JITFunction, target: GPUTarget, positional: tuple, meta: dict):
    """What ``kernel[grid](*positional, **meta)`` would compile on ``target``: Triton's binder
    and argument packing, as in ``JITFunction.run`` (triton 3.9)."""
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(
        meta,
        debug=knobs.runtime.debug,
        instrumentation_mode=knobs.compilation.instrumentation_mode,
        fpsan_homomorphic_casts=knobs.compilation.fpsan_homomorphic_casts,
    )
    bound, specialization, options = binder(*positional, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(
        backend, kwargs, bound, specialization, options
    )
    return ASTSource(kernel, signature, constexprs, attrs), options


def _cuobjdump(flag: str, cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run(
            [str(_BIN / "cuobjdump"), flag, f.name], check=True, capture_output=True, text=True
        ).stdout


def compile_case(case: Case, src: ASTSource, options, meta: dict) -> dict:
    """Compile one specialised case; its launch configuration and resources. ``local_bytes``
    is the per-thread local memory, which these kernels only use for register spills (Triton's
    ``n_spills`` on a GPU is local_bytes / 4)."""
    target = GPUTarget("cuda", case.arch, 32)
    compiled = triton.compile(src, target=target, options=options.__dict__)
    cubin = compiled.asm["cubin"]
    usage = dict(re.findall(r"\b(REG|LOCAL):(\d+)", _cuobjdump("-res-usage", cubin)))
    sass = _cuobjdump("-sass", cubin)
    return dict(
        dataclasses.asdict(case),
        BLOCK=meta["BLOCK"],
        num_warps=meta["num_warps"],
        ALIGN=meta["ALIGN"],
        **({"KP": meta["KP"]} if "KP" in meta else {}),  # the sparse loss's padded k
        n_regs=int(usage["REG"]),
        local_bytes=int(usage["LOCAL"]),
        shared=compiled.metadata.shared,
        ldg128=len(re.findall(r"\bLDG\.E\.128\b", sass)),
        ldg=len(re.findall(r"\bLDG\.E\b", sass)),
        stg128=len(re.findall(r"\bSTG\.E\.128\b", sass)),
        stg=len(re.findall(r"\bSTG\.E\b", sass)),
    )


def check_environment() -> str:
    """Why this process cannot compile for CUDA targets, or ''."""
    if "nvidia" not in triton.backends.backends:
        return f"triton {triton.__version__} has no CUDA backend"
    if not isinstance(kd_loss._kd_fwd_kernel, JITFunction):
        return "TRITON_INTERPRET is set: the kernels are interpreted, not compiled"
    return ""


def run(quick: bool = False, ops: tuple[str, ...] = OPS, log=sys.stderr) -> dict:
    """Compile the matrix; cases that specialise the same way (vocabularies alike modulo 16)
    are compiled once and listed together."""
    rows: dict[tuple, dict] = {}
    start = time.perf_counter()
    for case in cases(quick, ops):
        kernel, positional, meta = launch(case)
        src, options = specialise(kernel, GPUTarget("cuda", case.arch, 32), positional, meta)
        key = (case.arch, src.hash(), options.hash())
        if key in rows:
            rows[key]["vocabs"].append(case.vocab)
            continue
        row = compile_case(case, src, options, meta)
        row["vocabs"] = [row.pop("vocab")]
        rows[key] = row
        tail = f" {case.tail:<11}" if case.tail else ""
        print(
            f"sm_{case.arch} {case.op} {case.kernel} {case.dtype} {case.divergence:<15}{tail}"
            f" {case.setting:<14} V={case.vocab}: {row['n_regs']} regs, {row['local_bytes']} B"
            f" local, {row['ldg128']}/{row['ldg']} LDG.128, {row['stg128']}/{row['stg']} STG.128",
            file=log,
        )
    command = "python -m fastkd.kernels.aot" + (" --quick" if quick else "")
    if ops != OPS:
        command += " --ops " + " ".join(ops)
    return dict(
        triton=triton.__version__,
        command=command,
        seconds=round(time.perf_counter() - start, 1),
        kernels=list(rows.values()),
    )


def default_path() -> Path:
    return RESULTS / f"triton-{triton.__version__}.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastkd.kernels.aot", description=__doc__)
    parser.add_argument("--out", type=Path, default=None, help="JSON to write")
    parser.add_argument("--quick", action="store_true", help="the reduced matrix of the test")
    parser.add_argument(
        "--ops", nargs="+", choices=OPS, default=list(OPS), help="the ops whose kernels to compile"
    )
    opts = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") or (err := check_environment()):
        print(f"aot: cannot compile: {err or 'TRITON_INTERPRET is set'}", file=sys.stderr)
        return 2
    report = run(opts.quick, tuple(opts.ops))
    out = opts.out or default_path()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    spills = [k for k in report["kernels"] if k["local_bytes"]]
    print(
        f"aot: {len(report['kernels'])} kernels in {report['seconds']} s -> {out}; "
        f"{len(spills)} spill",
        file=sys.stderr,
    )
    return 1 if spills else 0


if __name__ == "__main__":
    sys.exit(main())
