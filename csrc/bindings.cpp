// The Python module fastkd._C. Importing it registers the kernels of every fastkd::* op this
// build has (TORCH_LIBRARY_IMPL in csrc/cpu and csrc/cuda); the op schemas are defined once,
// in fastkd/_ops.py. The functions below describe the build and the divergence codes and tail
// modes it compiled (csrc/kd_math.h), which tests compare with fastkd._options.
#include <pybind11/pybind11.h>

#include <string>

#include <ATen/Parallel.h>

#include "kd_math.h"

namespace {

pybind11::dict divergence_codes() {
  pybind11::dict codes;
#define FASTKD_DIVERGENCE_CODE(id, name) codes[name] = static_cast<int>(fastkd::id);
  FASTKD_DIVERGENCES(FASTKD_DIVERGENCE_CODE)
#undef FASTKD_DIVERGENCE_CODE
  return codes;
}

pybind11::dict tail_codes() {
  pybind11::dict codes;
#define FASTKD_TAIL_CODE(id, name) codes[name] = static_cast<int>(fastkd::id);
  FASTKD_TAILS(FASTKD_TAIL_CODE)
#undef FASTKD_TAIL_CODE
  return codes;
}

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
  m.def("divergence_codes", &divergence_codes,
        "The kernels' divergence codes, name -> the ops' `divergence` argument");
  m.def("tail_codes", &tail_codes,
        "The sparse kernels' tail modes, name -> the sparse ops' `tail` argument");
}
