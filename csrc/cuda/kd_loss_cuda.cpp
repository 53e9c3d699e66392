// CUDA kernels of fastkd::kd_loss_fwd and fastkd::kd_loss_bwd: the backend CudaBackend of the ops
// in csrc/kd_loss_op.h (docs/design.md §2), which launches the kernels of kd_loss.cu on the
// tensors' device and that device's current stream. Compiled only where torch has CUDA.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>

#include "cuda/kd_loss.h"
#include "kd_loss_op.h"

namespace fastkd::cuda {
namespace {

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "kd_loss: launching the CUDA kernel of ", op, " failed: ",
              cudaGetErrorString(err));
}

cudaStream_t stream_of(c10::Device device) {
  return c10::cuda::getCurrentCUDAStream(device.index()).stream();
}

}  // namespace

struct CudaBackend {
  static constexpr c10::DeviceType kDevice = c10::DeviceType::CUDA;
  static constexpr int64_t kMaxColumns = INT_MAX;  // the kernels index columns with int

  static void fwd(const KDParams& p, float* loss, float* stats, c10::Device device) {
    const c10::cuda::CUDAGuard guard(device);
    check_launch(kd_loss_fwd_launch(p, loss, stats, stream_of(device)), "kd_loss_fwd");
  }

  static void bwd(const KDParams& p, const KDGrad& g, c10::Device device) {
    const c10::cuda::CUDAGuard guard(device);
    check_launch(kd_loss_bwd_launch(p, g, stream_of(device)), "kd_loss_bwd");
  }
};

}  // namespace fastkd::cuda

// The schemas are defined in fastkd/_ops.py.
TORCH_LIBRARY_IMPL(fastkd, CUDA, m) {
  m.impl("kd_loss_fwd", &fastkd::kd_loss_fwd<fastkd::cuda::CudaBackend>);
  m.impl("kd_loss_bwd", &fastkd::kd_loss_bwd<fastkd::cuda::CudaBackend>);
}
