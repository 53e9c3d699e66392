// CUDA kernels of fastkd::kd_loss_fwd and fastkd::kd_loss_bwd: the torch-facing half. Checks the
// inputs, resolves the scalar arguments and calls the launchers of kd_loss.cu on the current
// stream. Compiled only where torch has CUDA. Contract: fastkd/_ops.py (schemas defined there).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <climits>
#include <cmath>
#include <optional>
#include <tuple>
#include <utility>

#include "cuda/kd_loss.h"
#include "kd_loss_checks.h"

namespace fastkd::cuda {
namespace {

Dtype kernel_dtype(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return Dtype::kFloat32;
    case at::kBFloat16: return Dtype::kBFloat16;
    default: return Dtype::kFloat16;  // kHalf: the only other dtype the checks let through
  }
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "kd_loss: launching the CUDA kernel of ", op, " failed: ",
              cudaGetErrorString(err));
}

// Checks the inputs both ops share and resolves the scalar arguments.
KDParams checked_params(const at::Tensor& student, const at::Tensor& teacher,
                        const std::optional<at::Tensor>& labels,
                        const std::optional<at::Tensor>& weights, int64_t divergence,
                        double temperature, double kd_weight, double ce_weight, double mix,
                        int64_t ignore_index, int64_t kd_vocab, double student_scale,
                        double student_softcap, double teacher_scale, double teacher_softcap) {
  TORCH_CHECK(student.is_cuda(), "kd_loss: student must be a CUDA tensor, got ", student.device());
  fastkd::check_inputs(student, teacher, labels, weights, divergence, temperature, mix, kd_vocab,
                       student_softcap, teacher_softcap);
  for (const auto& [x, name] : {std::pair{&student, "student"}, std::pair{&teacher, "teacher"}}) {
    TORCH_CHECK(x->size(1) <= INT_MAX, "kd_loss: ", name, " has ", x->size(1),
                " columns; the CUDA kernels take at most ", INT_MAX);
  }
  const bool mixture = is_mixture(divergence);
  KDParams p{};
  p.student = student.data_ptr();
  p.teacher = teacher.data_ptr();
  p.labels = labels ? labels->data_ptr<int64_t>() : nullptr;
  p.weights = weights ? weights->data_ptr<float>() : nullptr;
  p.n = student.size(0);
  p.s_stride = student.stride(0);
  p.t_stride = teacher.stride(0);
  p.l_stride = labels ? labels->stride(0) : 0;
  p.w_stride = weights ? weights->stride(0) : 0;
  p.ignore_index = ignore_index;
  p.vs = static_cast<int>(student.size(1));
  p.vt = static_cast<int>(teacher.size(1));
  p.kv = static_cast<int>(kd_vocab);
  p.divergence = static_cast<int>(divergence);
  p.temp = static_cast<float>(temperature);
  p.inv_t = static_cast<float>(1.0 / temperature);
  p.kd_w = static_cast<float>(kd_weight);
  p.ce_w = static_cast<float>(ce_weight);
  p.mix = static_cast<float>(mix);
  p.log_w1 = mixture ? static_cast<float>(std::log(mix)) : 0.0f;
  p.log_w2 = mixture ? static_cast<float>(std::log1p(-mix)) : 0.0f;
  p.s_scale = static_cast<float>(student_scale);
  p.s_cap = static_cast<float>(student_softcap);
  p.t_scale = static_cast<float>(teacher_scale);
  p.t_cap = static_cast<float>(teacher_softcap);
  p.has_kd = kd_weight != 0;
  p.has_ce = ce_weight != 0 && labels;  // no labels: no CE term (_ops.py)
  return p;
}

std::tuple<at::Tensor, at::Tensor> kd_loss_fwd(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
    const std::optional<at::Tensor>& weights, int64_t divergence, double temperature,
    double kd_weight, double ce_weight, double mix, int64_t ignore_index, int64_t kd_vocab,
    double student_scale, double student_softcap, double teacher_scale, double teacher_softcap) {
  const KDParams p = checked_params(student, teacher, labels, weights, divergence, temperature,
                                    kd_weight, ce_weight, mix, ignore_index, kd_vocab,
                                    student_scale, student_softcap, teacher_scale,
                                    teacher_softcap);
  const c10::cuda::CUDAGuard guard(student.device());
  const auto f32 = student.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({p.n}, f32);
  at::Tensor stats = at::empty({p.n, 4}, f32);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  check_launch(kd_loss_fwd_launch(p, kernel_dtype(student.scalar_type()), loss.data_ptr<float>(),
                                  stats.data_ptr<float>(), stream),
               "kd_loss_fwd");
  return {loss, stats};
}

void kd_loss_bwd(const at::Tensor& student, const at::Tensor& teacher,
                 const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& weights,
                 const at::Tensor& stats, const at::Tensor& grad_loss, int64_t divergence,
                 double temperature, double kd_weight, double ce_weight, double mix,
                 int64_t ignore_index, int64_t kd_vocab, double student_scale,
                 double student_softcap, double teacher_scale, double teacher_softcap,
                 at::Tensor& grad) {
  const KDParams p = checked_params(student, teacher, labels, weights, divergence, temperature,
                                    kd_weight, ce_weight, mix, ignore_index, kd_vocab,
                                    student_scale, student_softcap, teacher_scale,
                                    teacher_softcap);
  check_grad_inputs(student, stats, grad_loss, grad);

  const c10::cuda::CUDAGuard guard(student.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  check_launch(kd_loss_bwd_launch(p, kernel_dtype(student.scalar_type()), stats.data_ptr<float>(),
                                  grad_loss.data_ptr<float>(), grad_loss.stride(0),
                                  grad.data_ptr(), grad.stride(0), stream),
               "kd_loss_bwd");
}

}  // namespace
}  // namespace fastkd::cuda

// The schemas are defined in fastkd/_ops.py.
TORCH_LIBRARY_IMPL(fastkd, CUDA, m) {
  m.impl("kd_loss_fwd", &fastkd::cuda::kd_loss_fwd);
  m.impl("kd_loss_bwd", &fastkd::cuda::kd_loss_bwd);
}
