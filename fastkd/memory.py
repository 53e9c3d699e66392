"""Peak memory of a piece of code, measured the same way by the demo, the benchmarks and the
tests: in a fresh Python process, so nothing else the caller allocated is counted.

On CUDA it is ``torch.cuda.max_memory_allocated`` over what was allocated after the set-up; on
the CPU (PyTorch keeps no allocator statistics there) the process's peak resident set over its
resident set after the set-up (Linux: the peak is reset through /proc/self/clear_refs first).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

_TEMPLATE = """
import json, torch
cuda = {cuda!r}
{setup}
def _status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
if cuda:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
else:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # peak resident set := current
    base = _status("VmRSS")
{run}
if cuda:
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
else:
    peak = _status("VmHWM")
print("FASTKD_PEAK", json.dumps(max(0, peak - base)))
"""


def peak_memory_bytes(setup: str, run: str, *, cuda: bool = False, timeout: float = 600) -> int:
    """Bytes the code ``run`` needs at its peak beyond what ``setup`` left allocated.

    Both are Python source run in one fresh interpreter (``setup`` first). Run ``run`` once on
    a small input inside ``setup`` to load libraries and start thread pools, so that their
    one-off allocations are not counted.
    """
    code = _TEMPLATE.format(cuda=cuda, setup=textwrap.dedent(setup), run=textwrap.dedent(run))
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout
    )
    for line in out.stdout.splitlines():
        if line.startswith("FASTKD_PEAK "):
            return int(json.loads(line.split(" ", 1)[1]))
    raise RuntimeError(f"memory measurement failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
