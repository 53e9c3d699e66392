// Launchers of the CUDA kernels of fastkd::kd_loss_fwd / kd_loss_bwd (kd_loss.cu), called by the
// torch-facing code in kd_loss_cuda.cpp. Plain C++ and the CUDA runtime API only: nvcc compiles
// kd_loss.cu even where torch has no CUDA (DESIGN.md §5). Contract: fastkd/_ops.py.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kd_loss_codes.h"

namespace fastkd::cuda {

enum class Dtype { kFloat32, kBFloat16, kFloat16 };  // of student, teacher and grad

// One call: the rows and the checked, resolved scalar arguments. Strides are in elements; the
// columns of student, teacher and grad are contiguous.
struct KDParams {
  const void* student;    // [n, vs]
  const void* teacher;    // [n, vt]; columns >= min(vt, kv) read as -inf
  const int64_t* labels;  // [n] or nullptr
  const float* weights;   // [n] or nullptr (weight 1)
  int64_t n, s_stride, t_stride, l_stride, w_stride;
  int64_t ignore_index;
  int vs, vt, kv;  // student, teacher and KD vocabularies
  int divergence;  // Divergence
  float temp, inv_t, kd_w, ce_w, mix;
  float log_w1, log_w2;  // log(mix), log(1 - mix): the mixture's log weights
  float s_scale, s_cap, t_scale, t_cap;  // cap 0: no softcap
  bool has_kd, has_ce;  // kd_w != 0, ce_w != 0 with labels: a term with weight 0 is skipped
};

// loss [n] and stats [n, 4] (contiguous fp32): fastkd/_ops.py. Returns the launch status.
cudaError_t kd_loss_fwd_launch(const KDParams& p, Dtype dtype, float* loss, float* stats,
                               cudaStream_t stream);

// grad [n, vs] (row stride g_stride, may be p.student itself) = grad_loss[i] * d loss[i] / d
// student[i], from the forward's stats (contiguous [n, 4]); grad_loss has stride gl_stride.
cudaError_t kd_loss_bwd_launch(const KDParams& p, Dtype dtype, const float* stats,
                               const float* grad_loss, int64_t gl_stride, void* grad,
                               int64_t g_stride, cudaStream_t stream);

}  // namespace fastkd::cuda
