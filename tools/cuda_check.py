"""What `make cuda-check` asserts about a CUDA build of fastkd._C, without a GPU.

Run with the Python of a CUDA torch that has fastkd installed (the Makefile uses .venv-cuda):

    python tools/cuda_check.py [--archs 80,90]

Checks, each printed as one line; the exit status is 1 if any fails:
  - torch is a CUDA build and fastkd._C was built with the CUDA kernels;
  - the dispatcher has CUDA (and CPU) kernels for every fastkd op;
  - `cuobjdump` lists an ELF (SASS) for each architecture and PTX of the highest;
  - every backward kernel stores its gradient with 128-bit stores (STG.E.128) in every ELF.
The build matrix these checks stand for is docs/design.md §6.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

OPS = ("fastkd::kd_loss_fwd", "fastkd::kd_loss_bwd")
BACKWARD_KERNEL = "kd_bwd"
# Bits stored by `ST[G].E[.type]` in SASS; no type suffix is 32 bits.
STORE_BITS = {"U8": 8, "S8": 8, "U16": 16, "S16": 16, "64": 64, "128": 128}


class Report:
    def __init__(self) -> None:
        self.failures = 0

    def check(self, ok: bool, what: str, detail: str = "") -> bool:
        self.failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'}  {what}{f': {detail}' if detail else ''}")
        return ok


def find_cuobjdump() -> str | None:
    """The cuobjdump inside the triton wheel (system toolkits may lack one), else PATH's."""
    spec = importlib.util.find_spec("triton")
    for root in (spec and spec.submodule_search_locations) or ():
        tool = Path(root) / "backends" / "nvidia" / "bin" / "cuobjdump"
        if os.access(tool, os.X_OK):
            return str(tool)
    return shutil.which("cuobjdump")


def cuobjdump(tool: str, flag: str, library: str) -> str:
    return subprocess.run([tool, flag, library], check=True, capture_output=True, text=True).stdout


def demangle(name: str) -> str:
    tool = shutil.which("c++filt")
    if tool is None:
        return name
    return subprocess.run(
        [tool], input=name, check=True, capture_output=True, text=True
    ).stdout.strip()


def store_widths(sass: str) -> dict[tuple[str, str], dict[int, int]]:
    """(arch, kernel) -> {bits: count} of the global and generic stores in `cuobjdump -sass`."""
    widths: dict[tuple[str, str], dict[int, int]] = defaultdict(lambda: defaultdict(int))
    arch = kernel = ""
    for line in sass.splitlines():
        if m := re.match(r"\s*code for (sm_\w+)", line):
            arch = m.group(1)
        elif m := re.match(r"\s*Function : (\S+)", line):
            kernel = m.group(1)
        elif m := re.search(r"\bSTG?\.E((?:\.\w+)*)", line):
            types = [STORE_BITS[t] for t in m.group(1).split(".") if t in STORE_BITS]
            widths[(arch, kernel)][types[0] if types else 32] += 1
    return widths


def main() -> int:
    default_archs = (os.environ.get("FASTKD_CUDA_ARCHS") or "80;90").replace(";", ",")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--archs", default=default_archs, help="expected SASS architectures, e.g. 80,90"
    )
    args = parser.parse_args()
    archs = sorted((a for a in args.archs.split(",") if a), key=lambda a: (len(a), a))
    report = Report()

    import torch

    if not report.check(torch.version.cuda is not None, f"torch {torch.__version__} has CUDA"):
        return 1
    from fastkd import _C  # fastkd defines the op schemas; _C registers the kernels

    library = _C.__file__
    report.check(_C.has_cuda(), "fastkd._C has the CUDA kernels", library)
    for key in ("CUDA", "CPU"):
        missing = [op for op in OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(op, key)]
        report.check(
            not missing,
            f"dispatcher: {key} kernels of {', '.join(OPS)}",
            f"missing for {missing}" if missing else "",
        )

    tool = find_cuobjdump()
    if not report.check(tool is not None, "cuobjdump", tool or "not in triton's wheel nor on PATH"):
        return 1
    elf = set(re.findall(r"\.(sm_\w+)\.cubin", cuobjdump(tool, "--list-elf", library)))
    ptx = set(re.findall(r"\.(sm_\w+)\.ptx", cuobjdump(tool, "--list-ptx", library)))
    found = f"ELF {sorted(elf)}, PTX {sorted(ptx)}"
    for arch in archs:
        report.check(f"sm_{arch}" in elf, f"ELF (SASS) for sm_{arch}", found)
    report.check(f"sm_{archs[-1]}" in ptx, f"PTX for compute_{archs[-1]}", found)

    widths = store_widths(cuobjdump(tool, "-sass", library))
    backward = {key: w for key, w in widths.items() if BACKWARD_KERNEL in key[1]}
    narrow = sorted(f"{arch} {kernel}" for (arch, kernel), w in backward.items() if 128 not in w)
    totals: dict[int, int] = defaultdict(int)
    for w in backward.values():
        for width, count in w.items():
            totals[width] += count
    detail = f"their stores by bits {dict(sorted(totals.items()))}"
    if narrow:
        detail += f"; {len(narrow)} without a 128-bit store, e.g. {demangle(narrow[0])}"
    report.check(
        bool(backward) and not narrow,
        f"128-bit gradient stores in all {len(backward)} backward kernels (arch x variant)",
        detail,
    )

    print(f"cuda-check: {'passed' if not report.failures else f'{report.failures} failed'}")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
