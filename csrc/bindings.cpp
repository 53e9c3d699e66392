// The Python module fastkd._C. Importing it registers the kernels of every fastkd::* op this
// build has (TORCH_LIBRARY_IMPL in csrc/cpu and csrc/cuda); the op schemas are defined once,
// in fastkd/_ops.py. The functions below only describe the build.
#include <pybind11/pybind11.h>

#include <string>

#include <ATen/Parallel.h>

namespace {

bool has_cuda() {
#ifdef FASTKD_WITH_CUDA
  return true;
#else
  return false;
#endif
}

std::string build_info() {
  std::string info = "C++ kernels, compiler ";
#if defined(__clang__)
  info += "clang " __clang_version__;
#elif defined(__GNUC__)
  info += "gcc " __VERSION__;
#endif
  info += ", " + std::to_string(at::get_num_threads()) + " threads";
  info += has_cuda() ? ", CUDA kernels built" : ", no CUDA kernels";
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastkd native kernels (registered as torch.ops.fastkd.*)";
  m.def("has_cuda", &has_cuda, "Whether this build has the CUDA kernels");
  m.def("build_info", &build_info, "Compiler, threading and CUDA of this build");
}
