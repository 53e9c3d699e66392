"""The one harness every benchmark script uses: cases, timing, peak memory, JSON rows.

A *case* is one op at one shape, dtype and device, run by one *contender* (a fastkd backend,
eager PyTorch, ``torch.compile``, a peer library, or the *floor*: the hardware-bound work the
op cannot avoid) in one *mode* (``fwd``, ``bwd`` or ``full`` = fwd + bwd). Each op module
(``bench_<op>.py``) provides ``contenders(case)`` returning ``{name: Runner}``, and
``work(case, mode)`` returning the FLOPs and bytes of the floor, for TFLOP/s and GB/s.

Times are medians (with 20th/80th percentiles) of repeated runs after warm-up; the floor is
measured in the same run, so ratios do not depend on the machine's mood. Peak memory is the
extra memory one run of the mode needs beyond its inputs: ``max_memory_allocated`` on CUDA, a
fresh process's peak resident set on the CPU (``fastkd.memory``).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

MODES = ("fwd", "bwd", "full")


class Unavailable(Exception):
    """A contender that cannot run here (not installed, no GPU, dtype not supported)."""


@dataclass(frozen=True)
class Case:
    op: str
    bt: int  # tokens (rows)
    vocab: int
    dtype: str = "float32"
    device: str = "cpu"
    hidden: int = 0  # student hidden size (fused linear, train step)
    teacher_hidden: int = 0
    divergence: str = "kl"
    alpha: float = 0.5
    temperature: float = 2.0

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Case:
        return cls(**json.loads(text))


@dataclass
class Runner:
    """How to run a contender: ``forward()`` returns what ``backward(out)`` differentiates;
    ``full()`` defaults to both. For the floor, ``backward`` ignores its argument."""

    forward: Callable[[], object]
    backward: Callable[[object], None]
    full: Callable[[], None] | None = None
    notes: dict = field(default_factory=dict)

    def run(self, mode: str) -> None:
        if mode == "fwd":
            self.forward()
        elif mode == "bwd":
            self.backward(self.forward())
        elif self.full is not None:
            self.full()
        else:
            self.backward(self.forward())


def require_backend(case: Case, backend: str) -> None:
    """Raise Unavailable unless the fastkd ``backend`` runs the case's tensors here, compiled:
    Triton's interpreter (which runs CPU tensors in tests) is not a contender."""
    from fastkd.backends import select_backend

    if backend == "triton" and case.device != "cuda":
        raise Unavailable("Triton kernels run compiled on CUDA tensors only")
    try:
        select_backend(backend, torch.device(case.device), case.torch_dtype)
    except (RuntimeError, TypeError) as exc:
        raise Unavailable(str(exc)) from exc


def require_memory(case: Case, nbytes: float, what: str) -> None:
    """Raise Unavailable when ``what`` would need more memory than the device has free: an
    out-of-memory kill would end the whole run, not just this contender."""
    if case.device == "cuda":
        free = torch.cuda.mem_get_info()[0]
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if nbytes > 0.8 * free:
        raise Unavailable(f"{what} needs ~{nbytes / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free")


def op_module(op: str):
    return importlib.import_module(f"fastkd.bench.bench_{op}")


def runner_for(case: Case, contender: str) -> Runner:
    """Build one contender's runner (used in-process, and in the memory subprocess)."""
    builders = op_module(case.op).contenders(case)
    if contender not in builders:
        raise Unavailable(f"unknown contender {contender!r} for {case.op}")
    return builders[contender]()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_mode(
    runner: Runner, mode: str, device: str, *, warmup: int, reps: int, min_seconds: float
) -> list[float]:
    """Milliseconds of each timed run of ``mode`` (for ``bwd``, the backward alone: a fresh
    untimed forward precedes each)."""
    for _ in range(warmup):
        runner.run(mode)
    _sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < reps or (time.perf_counter() - start < min_seconds and len(times) < 100):
        if mode == "bwd":
            out = runner.forward()
            _sync(device)
            t0 = time.perf_counter()
            runner.backward(out)
        else:
            t0 = time.perf_counter()
            runner.run(mode)
        _sync(device)
        times.append(1e3 * (time.perf_counter() - t0))
    return times


def peak_memory_mb(case: Case, contender: str, mode: str) -> float:
    """Extra memory of one run of ``mode`` beyond the inputs, in MiB."""
    if case.device == "cuda":
        runner = runner_for(case, contender)
        runner.run(mode)  # warm-up: kernels compiled, workspaces allocated
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        runner.run(mode)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    from fastkd.memory import peak_memory_bytes

    setup = f"""
        from fastkd.bench.harness import Case, runner_for
        r = runner_for(Case.from_json({case.to_json()!r}), {contender!r})
        r.run({mode!r})
    """
    return peak_memory_bytes(setup, f"r.run({mode!r})") / 2**20


def environment() -> dict:
    """Device, versions and commit, recorded in every result file."""
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cuda": torch.version.cuda,
    }
    for name in ("fastkd", "triton", "transformers", "liger_kernel", "cut_cross_entropy"):
        try:
            module = importlib.import_module(name)
            info[name] = getattr(module, "__version__", "installed")
        except Exception:
            info[name] = None
    try:
        info["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except Exception:
        info["commit"] = None
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_slug(device: str) -> str:
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu-" + _cpu_name().split("(")[0]
    return "".join(c if c.isalnum() else "-" for c in name.strip().lower()).strip("-")


def run_case(
    case: Case,
    *,
    memory_modes: tuple[str, ...] = MODES,
    warmup: int = 2,
    reps: int = 5,
    min_seconds: float = 0.5,
    skip: tuple[str, ...] = (),
) -> list[dict]:
    """Every contender (and the floor) on one case, in every mode of its op: a JSON row per
    contender and mode, each time also given as a ratio to the floor's time for the mode."""
    module = op_module(case.op)
    modes = getattr(module, "MODES", MODES)
    rows = []
    floor_ms: dict[str, float] = {}
    names = list(module.contenders(case))
    names.sort(key=lambda n: n != "floor")  # the floor first: every ratio needs it
    for name in names:
        if name in skip:
            continue
        for mode in modes:
            row = {**dataclasses.asdict(case), "contender": name, "mode": mode}
            try:
                runner = runner_for(case, name)
                times = time_mode(
                    runner, mode, case.device, warmup=warmup, reps=reps, min_seconds=min_seconds
                )
            except Unavailable as exc:
                rows.append({**row, "status": "unavailable", "reason": str(exc)})
                break
            except Exception as exc:  # a contender that fails is a result, not a crash
                rows.append({**row, "status": "error", "reason": f"{type(exc).__name__}: {exc}"})
                continue
            q = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
            median = statistics.median(times)
            row.update(
                status="ok",
                median_ms=median,
                p20_ms=q[0],
                p80_ms=q[3],
                runs=len(times),
                **runner.notes,
            )
            if name == "floor":
                floor_ms[mode] = median
            if mode in floor_ms:
                row["ratio_to_floor"] = median / floor_ms[mode]
            flops, nbytes = module.work(case, mode)
            if flops:
                row["tflops"] = flops / median / 1e9
            if nbytes:
                row["gbps"] = nbytes / median / 1e6
            if mode in memory_modes:
                try:
                    row["peak_mem_mb"] = peak_memory_mb(case, name, mode)
                except Exception as exc:
                    row["peak_mem_error"] = f"{type(exc).__name__}: {exc}"[:500]
            rows.append(row)
            del runner
            if case.device == "cuda":
                torch.cuda.empty_cache()
    return rows


def write_results(path: Path, rows: list[dict]) -> None:
    """Write one run's rows, with the environment they were measured in, to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"environment": environment(), "rows": rows}, indent=1))
