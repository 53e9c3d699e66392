"""The one harness every benchmark script uses: cases, timing, peak memory, JSON rows.

A *case* is one op at one shape, dtype and device, run by one *contender* (a fastkd backend,
eager PyTorch, ``torch.compile``, a peer library, or the *floor*: the hardware-bound work the
op cannot avoid) in one *mode* (``fwd``, ``bwd`` or ``full`` = fwd + bwd). Each op module
(``bench_<op>.py``) provides ``contenders(case)`` returning ``{name: Runner}``, and
``work(case, mode)`` returning the FLOPs and bytes of the floor, for TFLOP/s and GB/s.

The contenders of a case are timed side by side: after warm-up, each *round* runs every
contender once, in turn, so a change of the machine's load hits all of them alike. Times are
medians (with 20th/80th percentiles) over the rounds; ``ratio_to_floor`` is the median of the
per-round ratios to the floor's time in the same round, and ``ratio_to_fastkd`` the same ratio
to fastkd's contender on the device (the op module's ``OURS``), so a peer's row says how many
times fastkd's time it took. Peak memory is the extra memory one
run of the mode needs beyond its inputs: ``max_memory_allocated`` on CUDA, a fresh process's
peak resident set on the CPU (``fastkd.memory``).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
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
    beta: float = 0.5  # jsd's mixture weight of the teacher (fastkd's and TRL's convention)
    top_k: int = 0  # a cached teacher's ids per token (the sparse losses)
    tail: str = "bucket"  # the sparse losses' tail mode

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


def _time_once(runner: Runner, mode: str, device: str) -> float:
    """Milliseconds of one run of ``mode`` (for ``bwd``, the backward alone: an untimed
    forward precedes it)."""
    out = None
    if mode == "bwd":
        out = runner.forward()
        _sync(device)
    t0 = time.perf_counter()
    if mode == "bwd":
        runner.backward(out)
    else:
        runner.run(mode)
    _sync(device)
    return 1e3 * (time.perf_counter() - t0)


def time_side_by_side(
    runners: dict[str, Runner],
    mode: str,
    device: str,
    *,
    warmup: int,
    reps: int,
    min_seconds: float,
) -> dict[str, list[float] | str]:
    """Milliseconds of each round's run of ``mode`` per contender: every round runs each
    contender once, in turn, until there are ``reps`` rounds and ``min_seconds`` have passed
    (at most 100 rounds). A contender that raises is dropped, its error given as text (not the
    exception, whose traceback would keep its tensors alive)."""
    result: dict[str, list[float] | str] = {}
    live = dict(runners)
    for name, runner in list(live.items()):
        try:
            for _ in range(warmup):
                runner.run(mode)
            _sync(device)
        except Exception as exc:  # a contender that fails is a result, not a crash
            result[name] = f"{type(exc).__name__}: {exc}"
            del live[name]
    times: dict[str, list[float]] = {name: [] for name in live}
    start = time.perf_counter()
    rounds = 0
    while live and (rounds < reps or (time.perf_counter() - start < min_seconds and rounds < 100)):
        for name, runner in list(live.items()):
            try:
                times[name].append(_time_once(runner, mode, device))
            except Exception as exc:
                result[name] = f"{type(exc).__name__}: {exc}"
                del live[name], times[name]
        rounds += 1
    result.update(times)
    return result


def peak_memory_mb(case: Case, contender: str, mode: str, runner: Runner | None = None) -> float:
    """Extra memory of one run of ``mode`` beyond the inputs, in MiB (on CUDA, of ``runner``
    when given)."""
    if case.device == "cuda":
        runner = runner or runner_for(case, contender)
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
    for name in ("fastkd", "triton", "transformers", "liger-kernel", "cut-cross-entropy"):
        try:
            info[name.replace("-", "_")] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info[name.replace("-", "_")] = None
    try:
        # "-dirty" when the work tree had uncommitted changes.
        info["commit"] = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
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
    """Every contender (and the floor) on one case, timed side by side in every mode of its
    op: a JSON row per contender and mode (one row for an unavailable contender)."""
    module = op_module(case.op)
    modes = getattr(module, "MODES", MODES)
    rows = []
    runners: dict[str, Runner] = {}
    names = [n for n in module.contenders(case) if n not in skip]
    names.sort(key=lambda n: n != "floor")  # the floor first: every ratio needs it
    for name in names:
        base = {**dataclasses.asdict(case), "contender": name}
        try:
            runners[name] = runner_for(case, name)
        except Unavailable as exc:
            rows.append({**base, "mode": modes[0], "status": "unavailable", "reason": str(exc)})
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            rows.append({**base, "mode": modes[0], "status": "error", "reason": reason})
    for mode in modes:
        timed = time_side_by_side(
            runners, mode, case.device, warmup=warmup, reps=reps, min_seconds=min_seconds
        )
        floor = timed.get("floor")
        ours = timed.get(getattr(module, "OURS", {}).get(case.device, "fastkd"))
        for name, times in timed.items():
            row = {**dataclasses.asdict(case), "contender": name, "mode": mode}
            if isinstance(times, str):
                rows.append({**row, "status": "error", "reason": times})
                continue
            q = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
            median = statistics.median(times)
            row.update(
                status="ok",
                median_ms=median,
                p20_ms=q[0],
                p80_ms=q[3],
                runs=len(times),
                **runners[name].notes,
            )
            for key, base in (("ratio_to_floor", floor), ("ratio_to_fastkd", ours)):
                if isinstance(base, list):
                    row[key] = statistics.median(t / b for t, b in zip(times, base))
            if "exps" in row:  # the exp-throughput floor: how fast this CPU computes e^x
                row["gexp_per_s"] = row["exps"] / median / 1e6
            flops, nbytes = module.work(case, mode)
            if flops:
                row["tflops"] = flops / median / 1e9
            if nbytes:
                row["gbps"] = nbytes / median / 1e6
            if mode in memory_modes:
                try:
                    row["peak_mem_mb"] = peak_memory_mb(case, name, mode, runners[name])
                except Exception as exc:
                    row["peak_mem_error"] = f"{type(exc).__name__}: {exc}"[:500]
            rows.append(row)
    runners.clear()
    if case.device == "cuda":
        torch.cuda.empty_cache()
    return rows


def write_results(path: Path, rows: list[dict], env: dict | None = None, **extra: object) -> None:
    """Write one run's rows, with the environment they were measured in (``env``, taken when
    the run started; default: now) and ``extra`` top-level entries, to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"environment": env or environment(), **extra, "rows": rows}
    path.write_text(json.dumps(data, indent=1))
