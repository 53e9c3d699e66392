"""``fastkd check-gpu``: what only a CUDA GPU can show, in one command (docs/design.md §6).

Steps, each a subprocess with a hard time limit (the plan fits 25 minutes on one H100):

1. ``build``: rebuild the extension (``pip install --no-build-isolation -e .``, for this GPU's
   architecture unless ``FASTKD_CUDA_ARCHS`` is set) when ``fastkd._C`` is missing, has no CUDA
   kernels or is older than ``csrc/``.
2. ``tests``: the correctness suite on CUDA tensors (the triton and cuda backends against the
   fp64 reference; ``tests/test_gpu.py``: the bf16 tensor-core GEMM path, multi-GPU placement).
3. ``memcheck``: ``compute-sanitizer --tool memcheck`` on a small case, when it is installed.
4. ``bench``: the benchmark suite at real shapes in bf16 against Liger-Kernel and Cut
   Cross-Entropy (when installed); JSON and plots under ``bench/results/<device>/``.

Then a summary of what passed, failed and was skipped, and why, also written to
``<out>/check-gpu.json``; the exit status is 1 on any failure. Logs go to ``<out>/logs/``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
import warnings
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOTAL_BUDGET_S = 25 * 60
# Hard limit of each step, in seconds; their sum leaves a minute of the 25 for start-up.
# build: the extension's few translation units for one architecture, in parallel.
# tests: a few hundred small cases; Triton compiles each kernel variant once (~1 s each).
# bench: `bench_plan` cases (10); each is ~7 contenders x 3 modes x (2 warm-up + >= 5 timed
#   rounds, >= 0.5 s) plus torch.compile's compilation at a new shape: about a minute, so the
#   suite starts no new case after BENCH_SOFT_S and lists the cases it left out.
# memcheck: compute-sanitizer slows CUDA's start-up and every launch; the case is tiny.
BUDGETS_S = {"build": 300, "tests": 330, "memcheck": 150, "bench": 600}
QUICK_BUDGETS_S = {"build": 300, "tests": 180, "memcheck": 150, "bench": 180}
BENCH_SOFT_S = {False: 450, True: 90}  # by --quick: a case started at it still ends in time
TEST_FILES = (  # those present
    "tests/test_kd_loss.py",
    "tests/test_fused_linear_kd_loss.py",
    "tests/test_ops.py",
    "tests/test_triton_launch.py",  # the launchers' device guard and stream, aligned rows
    "tests/test_triton_aot.py",
    "tests/test_gpu.py",
)
QUICK_TEST_FILES = ("tests/test_ops.py", "tests/test_triton_launch.py", "tests/test_gpu.py")
# The benchmark's order: the fused linear op (the peers' home ground) first, so a spent budget
# cuts the least informative cases. The reference backend is plain PyTorch, like eager.
BENCH_OPS = ("fused_linear_kd_loss", "kd_loss", "train_step")
BENCH_SKIP = ("fastkd-reference",)

# The memcheck case: every kernel backend, fp32 and bf16, every divergence, V = GPT-2's 50257
# (not a multiple of 16: the masked tail of the vectorised loads), a few ignored labels.
MEMCHECK_SCRIPT = """
import torch, fastkd
from fastkd._options import DIVERGENCES
g = torch.Generator(device="cuda").manual_seed(0)
n, v = 7, 50257
for backend in ("cuda", "triton"):
    status = fastkd.backends()[backend]
    if not status.available:
        print(f"memcheck: {backend} backend unavailable: {status.reason}")
        continue
    for dtype in (torch.float32, torch.bfloat16):
        def randn(*shape):
            return torch.randn(*shape, device="cuda", generator=g).to(dtype)
        s, t = randn(n, v).requires_grad_(True), randn(n, v)
        y = torch.randint(0, v, (n,), device="cuda", generator=g)
        y[::3] = -100
        for divergence in DIVERGENCES:
            fastkd.kd_loss(s, t, y, divergence=divergence, backend=backend).backward()
        h, w = randn(n, 64).requires_grad_(True), randn(v, 64).requires_grad_(True)
        fastkd.fused_linear_kd_loss(
            h, w, y, teacher_hidden=randn(n, 32), teacher_weight=randn(v, 32), chunk_size=4,
            backend=backend,
        ).backward()
    print(f"memcheck: {backend} ran")
torch.cuda.synchronize()
"""


@dataclass
class StepResult:
    name: str
    status: str  # "ok", "failed" or "skipped"
    seconds: float
    detail: str
    skipped: list[str]  # what the step left out, and why
    log: str | None = None


def bench_plan(quick: bool) -> dict[str, int]:
    """Number of benchmark cases per op that ``fastkd check-gpu`` asks for."""
    from fastkd.bench.run import cases

    return {op: len(cases(op, "cuda", "bfloat16", quick)) for op in BENCH_OPS}


def no_gpu_reason() -> str | None:
    """Why this machine cannot run the check, or None when a CUDA GPU is usable."""
    import torch

    with warnings.catch_warnings():  # a CUDA torch without a driver warns here
        warnings.simplefilter("ignore")
        if torch.cuda.is_available():
            return None
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    where = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
    return f"torch {torch.__version__} sees no CUDA device{where}"


def _child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, **extra)
    env.pop("TRITON_INTERPRET", None)  # the point is compiled Triton on the GPU
    return env


def _run(cmd: list[str], log: Path, timeout: float, *, echo: bool, env=None) -> int | None:
    """Run ``cmd`` in the repository, its output to ``log`` (and to stdout with ``echo``).
    Returns the exit status, or None when it ran past ``timeout`` and was killed."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env or _child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # so a timeout ends its children too
        )

        def copy() -> None:
            for line in proc.stdout:
                f.write(line)
                if echo:
                    sys.stdout.write(line)
                    sys.stdout.flush()

        reader = threading.Thread(target=copy, daemon=True)
        reader.start()
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            code = None
        reader.join(timeout=10)
    return code


def _tail(log: Path, lines: int = 25) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def _has_fresh_cuda_build() -> tuple[bool, str]:
    """Whether fastkd._C imports, has the CUDA kernels and is newer than csrc/ (checked in a
    fresh interpreter: this one may hold an old build)."""
    probe = "import fastkd._C as c; print(c.has_cuda(), c.__file__)"
    r = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    if r.returncode:
        lines = (r.stderr or r.stdout).strip().splitlines()
        return False, f"fastkd._C does not import ({lines[-1] if lines else r.returncode})"
    has_cuda, path = r.stdout.split()
    if has_cuda != "True":
        return False, "fastkd._C has no CUDA kernels"
    sources = [p for p in (ROOT / "csrc").rglob("*") if p.is_file()] + [ROOT / "CMakeLists.txt"]
    built = Path(path).stat().st_mtime
    if any(p.stat().st_mtime > built for p in sources if p.exists()):
        return False, "fastkd._C is older than csrc/"
    return True, f"fastkd._C has CUDA kernels ({Path(path).name}), not rebuilt"


def _not_a_checkout() -> str | None:
    if (ROOT / "pyproject.toml").is_file() and (ROOT / "tests").is_dir():
        return None
    return f"{ROOT} is not a source checkout: clone fastkd and `pip install -e .` it"


def step_build(logs: Path, budget: float) -> StepResult:
    if why := _not_a_checkout():
        return StepResult("build", "failed", 0.0, why, [])
    start = time.monotonic()
    fresh, why = _has_fresh_cuda_build()
    if fresh:
        return StepResult("build", "ok", time.monotonic() - start, why, [])
    import torch

    major, minor = torch.cuda.get_device_capability()
    archs = os.environ.get("FASTKD_CUDA_ARCHS") or f"{major}{minor}"
    log = logs / "build.log"
    print(f"build: {why}; building for sm_{archs.replace(';', ', sm_')} (log: {log}) ...")
    cmd = [sys.executable, "-m", "pip", "install", "-v", "--no-deps", "--no-build-isolation"]
    code = _run(
        [*cmd, "-e", str(ROOT)],
        log,
        budget - (time.monotonic() - start),
        echo=False,
        env=_child_env(FASTKD_CUDA_ARCHS=archs),
    )
    seconds = time.monotonic() - start
    if code != 0:
        ended = "timed out" if code is None else f"exit {code}"
        return StepResult("build", "failed", seconds, f"{ended}:\n{_tail(log)}", [], str(log))
    fresh, after = _has_fresh_cuda_build()
    if not fresh:
        return StepResult("build", "failed", seconds, f"built, but {after}", [], str(log))
    return StepResult("build", "ok", seconds, f"rebuilt for sm_{archs} ({why})", [], str(log))


def _junit_summary(xml: Path) -> tuple[str, list[str]]:
    """'N passed, N failed, N skipped' and the skip reasons (with counts) of a JUnit file."""
    root = ET.parse(xml).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors")}
    reasons = Counter(
        (skip.get("message") or "no reason given").strip()
        for case in root.iter("testcase")
        for skip in case.findall("skipped")
    )
    skipped = sum(reasons.values())
    failed = total["failures"] + total["errors"]
    summary = f"{total['tests'] - failed - skipped} passed, {failed} failed, {skipped} skipped"
    return summary, [f"{n} tests: {reason}" for reason, n in reasons.most_common()]


def step_tests(logs: Path, budget: float, quick: bool) -> StepResult:
    if why := _not_a_checkout():
        return StepResult("tests", "failed", 0.0, why, [])
    start = time.monotonic()
    files = [f for f in (QUICK_TEST_FILES if quick else TEST_FILES) if (ROOT / f).exists()]
    log, xml = logs / "tests.log", logs / "tests.xml"
    xml.unlink(missing_ok=True)
    print(f"tests: {' '.join(files)} on CUDA (log: {log}) ...")
    # -m "not slow": the slow tests in these files measure CPU memory; `make test` runs them.
    cmd = [sys.executable, "-m", "pytest", *files, "-q", "-m", "not slow", f"--junitxml={xml}"]
    code = _run([*cmd, "-p", "no:cacheprovider"], log, budget, echo=True)
    seconds = time.monotonic() - start
    summary, skipped = _junit_summary(xml) if xml.exists() else ("no results", [])
    skipped.append("slow tests (CPU memory measurements): run by `make test`")
    if code != 0:
        ended = "timed out" if code is None else f"pytest exit {code}"
        return StepResult("tests", "failed", seconds, f"{ended}; {summary}", skipped, str(log))
    return StepResult("tests", "ok", seconds, summary, skipped, str(log))


def _sanitizer() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    return shutil.which("compute-sanitizer") or shutil.which(
        "compute-sanitizer", path=str(Path(cuda_home) / "bin")
    )


def step_memcheck(logs: Path, budget: float) -> StepResult:
    sanitizer = _sanitizer()
    if sanitizer is None:
        reason = "compute-sanitizer is not on PATH nor in $CUDA_HOME/bin"
        return StepResult("memcheck", "skipped", 0.0, reason, [f"memcheck: {reason}"])
    start = time.monotonic()
    log = logs / "memcheck.log"
    print(f"memcheck: {sanitizer} on a small case (log: {log}) ...")
    cmd = [sanitizer, "--tool", "memcheck", "--error-exitcode", "1"]
    code = _run([*cmd, sys.executable, "-c", MEMCHECK_SCRIPT], log, budget, echo=False)
    seconds = time.monotonic() - start
    text = log.read_text(errors="replace")
    unavailable = [line for line in text.splitlines() if "backend unavailable" in line]
    if code != 0:
        ended = "timed out" if code is None else f"exit {code}"
        return StepResult("memcheck", "failed", seconds, f"{ended}:\n{_tail(log)}", [], str(log))
    summary = next((ln for ln in text.splitlines() if "ERROR SUMMARY" in ln), "no errors")
    return StepResult("memcheck", "ok", seconds, summary.strip(), unavailable, str(log))


def read_bench_log(log: Path) -> tuple[int, list[str], list[str]]:
    """From the result files a ``fastkd bench`` run wrote (its "wrote PATH" lines): the number
    of cases measured, the failures (an error of fastkd or of the floor) and what was skipped
    (unavailable contenders, errors of the others, e.g. eager out of memory, cases past the
    time budget)."""
    lines = log.read_text(errors="replace").splitlines()
    written = [line.removeprefix("wrote ") for line in lines if line.startswith("wrote ")]
    ran, failures, skipped = 0, [], []
    for path in (Path(w) for w in written if w.endswith(".json")):
        data = json.loads(path.read_text())
        op = path.stem
        ran += len({(r["bt"], r["vocab"], r["alpha"]) for r in data["rows"]})
        skipped += [f"bench {op} {c}: time budget spent" for c in data.get("skipped_cases", [])]
        errors = {r["contender"] for r in data["rows"] if r["status"] == "error"}
        reasons = {(r["contender"], r["reason"]) for r in data["rows"] if r["status"] != "ok"}
        for contender, reason in sorted(reasons):
            ours = contender.startswith("fastkd") or contender == "floor"
            line = f"bench {op} {contender}: {reason}"
            (failures if ours and contender in errors else skipped).append(line)
    return ran, failures, skipped


def step_bench(logs: Path, out: Path, budget: float, quick: bool) -> StepResult:
    start = time.monotonic()
    log = logs / "bench.log"
    plan = bench_plan(quick)
    print(f"bench: {plan} cases, bf16 (log: {log}) ...")
    cmd = [sys.executable, "-m", "fastkd", "bench", "--device", "cuda", "--dtype", "bfloat16"]
    cmd += ["--out", str(out), "--time-budget", str(BENCH_SOFT_S[quick])]
    cmd += [a for op in BENCH_OPS for a in ("--op", op)]
    cmd += [a for name in BENCH_SKIP for a in ("--skip", name)]
    code = _run([*cmd, *(["--quick"] if quick else [])], log, budget, echo=True)
    seconds = time.monotonic() - start
    ran, failures, skipped = read_bench_log(log)
    skipped += [f"bench {name}: left out (plain PyTorch, as eager)" for name in BENCH_SKIP]
    detail = f"{ran} cases measured (plan: {plan}), results in {out}"
    if code != 0 or failures:
        ended = "timed out" if code is None else f"exit {code}"
        detail = "; ".join([ended if code != 0 else "contender errors", *failures, detail])
        return StepResult("bench", "failed", seconds, detail, skipped, str(log))
    return StepResult("bench", "ok", seconds, detail, skipped, str(log))


def _summary(results: list[StepResult], device: str) -> str:
    lines = [f"fastkd check-gpu on {device}:"]
    for r in results:
        first, *rest = r.detail.splitlines() or [""]
        lines.append(
            f"  {r.name:<9} {r.status.upper() if r.status == 'failed' else r.status:<7} "
            f"{r.seconds:5.0f} s  {first}"
        )
        lines += [f"      {line}" for line in rest]
    skipped = [s for r in results for s in r.skipped]
    if skipped:
        lines.append("skipped:")
        lines += [f"  - {s}" for s in skipped]
    failed = [r.name for r in results if r.status == "failed"]
    lines.append(f"result: {'FAILED (' + ', '.join(failed) + ')' if failed else 'all passed'}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """The whole check; returns the exit status."""
    if reason := no_gpu_reason():
        print(f"fastkd check-gpu: no CUDA GPU here ({reason}); nothing checked", file=sys.stderr)
        return 1
    import torch

    from fastkd.bench.harness import device_slug, environment
    from fastkd.bench.run import RESULTS

    device = f"{torch.cuda.get_device_name()} x{torch.cuda.device_count()}"
    out = (args.out or RESULTS / device_slug("cuda")).resolve()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    budgets = QUICK_BUDGETS_S if args.quick else BUDGETS_S
    print(f"fastkd check-gpu on {device}: steps and time limits {budgets} s, results in {out}")
    results: list[StepResult] = []

    def skip(name: str, why: str) -> None:
        results.append(StepResult(name, "skipped", 0.0, why, [f"{name}: {why}"]))

    if args.skip_build:
        skip("build", "--skip-build")
    else:
        results.append(step_build(logs, budgets["build"]))
    if args.skip_tests:
        skip("tests", "--skip-tests")
        skip("memcheck", "--skip-tests")
    else:
        results.append(step_tests(logs, budgets["tests"], args.quick))
        results.append(step_memcheck(logs, budgets["memcheck"]))
    if args.skip_bench:
        skip("bench", "--skip-bench")
    else:
        results.append(step_bench(logs, out, budgets["bench"], args.quick))

    summary = _summary(results, device)
    print(summary)
    report = {
        "environment": environment(),
        "quick": args.quick,
        "steps": [asdict(r) for r in results],
    }
    (out / "check-gpu.json").write_text(json.dumps(report, indent=1))
    return 1 if any(r.status == "failed" for r in results) else 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--skip-build", action="store_true", help="use fastkd._C as it is")
    parser.add_argument(
        "--skip-tests", action="store_true", help="no correctness suite, no memcheck"
    )
    parser.add_argument("--skip-bench", action="store_true", help="no benchmark")
    parser.add_argument(
        "--quick", action="store_true", help="a few minutes: fewer tests, the tiny bench shapes"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results directory (default: bench/results/<device>); logs in <out>/logs",
    )
