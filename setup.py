"""Build of fastkd: the Python packages plus the native extension fastkd._C, which CMakeLists.txt
describes (this file only drives CMake).

Install without build isolation, so the build sees the torch that is installed:
    pip install --no-build-isolation -e .
FASTKD_SKIP_NATIVE=1 skips the native build (fastkd then runs on its Triton and reference
backends); FASTKD_CUDA=0 skips the CUDA kernels; FASTKD_CUDA_ARCHS picks their architectures
(default 80;90). An editable install puts fastkd/_C*.so into the source tree, so a second
environment with another torch (e.g. `make cuda-check`'s .venv-cuda) installs non-editable.
The build matrix is docs/design.md §6.
"""

import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


def cmake_build_name() -> str:
    """One CMake build directory per Python and torch build (e.g. cmake-py311-torch2.14.1-cu130),
    so environments with a CPU and a CUDA torch do not rebuild over each other's objects."""
    import torch  # only when building: the build uses the installed torch (no build isolation)

    version = torch.__version__.split("+")[0]
    cuda = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    return f"cmake-py{sys.version_info.major}{sys.version_info.minor}-torch{version}-{cuda}"


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def run(self) -> None:
        if os.environ.get("FASTKD_SKIP_NATIVE", "0") not in ("", "0"):
            print("fastkd: FASTKD_SKIP_NATIVE is set, not building fastkd._C")
            return
        super().run()

    def build_extension(self, ext: Extension) -> None:
        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = ROOT / "build" / cmake_build_name()
        configure = [
            "cmake",
            "-S",
            str(ROOT),
            "-B",
            str(build_dir),
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DFASTKD_OUTPUT_DIR={out_dir}",
            f"-DFASTKD_CUDA={'OFF' if os.environ.get('FASTKD_CUDA') == '0' else 'ON'}",
            f"-DFASTKD_CUDA_ARCHS={os.environ.get('FASTKD_CUDA_ARCHS', '')}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run(configure, check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "-j", jobs], check=True)


setup(
    packages=["fastkd", "fastkd.kernels", "fastkd.training", "fastkd.bench"],
    package_dir={"fastkd": "fastkd", "fastkd.kernels": "kernels", "fastkd.bench": "bench"},
    ext_modules=[CMakeExtension("fastkd._C")],
    cmdclass={"build_ext": CMakeBuild},
)
