// Launchers of the CUDA kernels of fastkd::kd_loss_fwd / kd_loss_bwd (kd_loss.cu), called by the
// CUDA backend in kd_loss_cuda.cpp. Plain C++ and the CUDA runtime API only: nvcc compiles
// kd_loss.cu even where torch has no CUDA (docs/design.md §6). Contract: docs/design.md §2.
#pragma once

#include <cuda_runtime_api.h>

#include "kd_params.h"

namespace fastkd::cuda {

// loss [n] and stats [n, 4] (contiguous fp32), p.n > 0. Returns the launch status.
cudaError_t kd_loss_fwd_launch(const KDParams& p, float* loss, float* stats, cudaStream_t stream);

// g.grad = g.grad_loss[i] * d loss[i] / d student[i], from the forward's stats; p.n > 0.
cudaError_t kd_loss_bwd_launch(const KDParams& p, const KDGrad& g, cudaStream_t stream);

}  // namespace fastkd::cuda
