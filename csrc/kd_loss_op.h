// The torch-facing half of fastkd::kd_loss_fwd / kd_loss_bwd, written once for every native
// backend (docs/design.md §2): the input checks (TORCH_CHECK messages name the argument), the
// resolution of the op's arguments into a KDParams, and the ops as templates over a backend.
// csrc/cpu/kd_loss.cpp and csrc/cuda/kd_loss_cuda.cpp instantiate and register them; the
// schemas (argument order: fastkd._options.KernelArgs) are defined in fastkd/_ops.py. Included
// by .cpp files only: the CUDA kernels see kd_params.h, not torch.
//
// A backend is a class with
//   static constexpr c10::DeviceType kDevice;  // of the student, hence of every tensor
//   static constexpr int64_t kMaxColumns;      // the widest row its kernels index
//   static void fwd(const KDParams&, float* loss, float* stats, c10::Device);
//   static void bwd(const KDParams&, const KDGrad&, c10::Device);
// fwd and bwd run on the tensors' device and are not called for n = 0 rows. A backend that
// registers fastkd::kd_loss_fwd_bwd (the CPU's) also has
//   static void fwd_bwd(const KDParams&, const KDGrad&, float* loss, float* stats, c10::Device);
// which does what fwd then bwd do, KDGrad's stats being `stats`.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <utility>

#include "kd_params.h"

namespace fastkd {

inline void check_on_device(const at::Tensor& x, const char* name, const at::Tensor& student) {
  TORCH_CHECK(x.device() == student.device(), "kd_loss: ", name,
              " must be on the student's device ", student.device(), ", got ", x.device());
}

inline void check_last_dim(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, "kd_loss: ", name,
              " must have a contiguous last dimension (stride(1) == 1), got strides ", x.strides());
}

inline void check_per_row(const at::Tensor& x, const char* name, at::ScalarType dtype, int64_t n,
                          const at::Tensor& student) {
  check_on_device(x, name, student);
  TORCH_CHECK(x.scalar_type() == dtype, "kd_loss: ", name, " must be ", dtype, ", got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() == 1 && x.size(0) == n, "kd_loss: ", name, " must have shape [", n,
              "] (one entry per row), got ", x.sizes());
}

inline Dtype kernel_dtype(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return Dtype::kFloat32;
    case at::kBFloat16: return Dtype::kBFloat16;
    case at::kHalf: return Dtype::kFloat16;
    default:
      TORCH_CHECK(false, "kd_loss: student must be float32, bfloat16 or float16, got ", dtype);
  }
}

// Checks the scalar arguments of the dense and the sparse ops (csrc/sparse_kd_loss_op.h, whose
// student has no teacher_softcap beside it: 0).
inline void check_scalars(int64_t divergence, double temperature, double mix,
                          double student_softcap, double teacher_softcap) {
  TORCH_CHECK(divergence >= 0 && divergence < kNumDivergences,
              "kd_loss: divergence code must be in [0, ", static_cast<int>(kNumDivergences),
              "), got ", divergence);
  TORCH_CHECK(temperature > 0 && std::isfinite(temperature),
              "kd_loss: temperature must be finite and > 0, got ", temperature);
  TORCH_CHECK(!is_mixture(divergence) || (mix > 0 && mix < 1),
              "kd_loss: mix (beta or skew) must be in (0, 1) for divergence code ", divergence,
              ", got ", mix);
  TORCH_CHECK(student_softcap >= 0 && teacher_softcap >= 0,
              "kd_loss: softcaps must be >= 0 (0: none), got ", student_softcap, " and ",
              teacher_softcap);
}

// Checks the tensors and scalar arguments both ops take and resolves them.
template <class Backend>
KDParams resolve_params(const at::Tensor& student, const at::Tensor& teacher,
                        const std::optional<at::Tensor>& labels,
                        const std::optional<at::Tensor>& weights, int64_t divergence,
                        double temperature, double kd_weight, double ce_weight, double mix,
                        int64_t ignore_index, int64_t kd_vocab, double student_scale,
                        double student_softcap, double teacher_scale, double teacher_softcap) {
  TORCH_CHECK(student.device().type() == Backend::kDevice, "kd_loss: student must be a ",
              Backend::kDevice, " tensor, got ", student.device());
  check_on_device(teacher, "teacher", student);
  for (const auto& [x, name] : {std::pair{&student, "student"}, std::pair{&teacher, "teacher"}}) {
    TORCH_CHECK(x->dim() == 2, "kd_loss: ", name, " must be 2-D [N, V], got shape ", x->sizes());
    check_last_dim(*x, name);
    TORCH_CHECK(x->size(1) <= Backend::kMaxColumns, "kd_loss: ", name, " has ", x->size(1),
                " columns; the ", Backend::kDevice, " kernels take at most ",
                Backend::kMaxColumns);
  }
  const Dtype dtype = kernel_dtype(student.scalar_type());
  TORCH_CHECK(teacher.scalar_type() == student.scalar_type(),
              "kd_loss: teacher must have the student's dtype ", student.scalar_type(), ", got ",
              teacher.scalar_type());
  const int64_t n = student.size(0), vs = student.size(1);
  TORCH_CHECK(teacher.size(0) == n, "kd_loss: teacher has ", teacher.size(0),
              " rows but student has ", n);
  if (labels) check_per_row(*labels, "labels", at::kLong, n, student);
  if (weights) check_per_row(*weights, "weights", at::kFloat, n, student);
  check_scalars(divergence, temperature, mix, student_softcap, teacher_softcap);
  TORCH_CHECK(kd_vocab >= 1 && kd_vocab <= vs, "kd_loss: kd_vocab must be in [1, ", vs,
              "] (the student vocabulary), got ", kd_vocab);
  const bool mixture = is_mixture(divergence);

  KDParams p{};
  p.student = student.data_ptr();
  p.teacher = teacher.data_ptr();
  p.labels = labels ? labels->data_ptr<int64_t>() : nullptr;
  p.weights = weights ? weights->data_ptr<float>() : nullptr;
  p.n = n;
  p.s_stride = student.stride(0);
  p.t_stride = teacher.stride(0);
  p.l_stride = labels ? labels->stride(0) : 0;
  p.w_stride = weights ? weights->stride(0) : 0;
  p.ignore_index = ignore_index;
  p.vs = vs;
  p.vt = teacher.size(1);
  p.kv = kd_vocab;
  p.dtype = dtype;
  p.divergence = static_cast<int>(divergence);
  p.temp = static_cast<float>(temperature);
  p.inv_t = static_cast<float>(1.0 / temperature);
  p.kd_w = static_cast<float>(kd_weight);
  p.ce_w = static_cast<float>(ce_weight);
  p.mix = {static_cast<float>(mix), mixture ? static_cast<float>(std::log(mix)) : 0.0f,
           mixture ? static_cast<float>(std::log1p(-mix)) : 0.0f};
  p.s_scale = static_cast<float>(student_scale);
  p.s_cap = static_cast<float>(student_softcap);
  p.t_scale = static_cast<float>(teacher_scale);
  p.t_cap = static_cast<float>(teacher_softcap);
  p.has_kd = kd_weight != 0;
  p.has_ce = ce_weight != 0 && labels;  // no labels: no CE term (docs/design.md §2)
  return p;
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor> kd_loss_fwd(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
    const std::optional<at::Tensor>& weights, int64_t divergence, double temperature,
    double kd_weight, double ce_weight, double mix, int64_t ignore_index, int64_t kd_vocab,
    double student_scale, double student_softcap, double teacher_scale, double teacher_softcap) {
  const KDParams p = resolve_params<Backend>(
      student, teacher, labels, weights, divergence, temperature, kd_weight, ce_weight, mix,
      ignore_index, kd_vocab, student_scale, student_softcap, teacher_scale, teacher_softcap);
  const auto f32 = student.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({p.n}, f32);
  at::Tensor stats = at::empty({p.n, 4}, f32);
  if (p.n > 0) Backend::fwd(p, loss.data_ptr<float>(), stats.data_ptr<float>(), student.device());
  return {loss, stats};
}

// Checks what the backward takes beyond the forward's arguments: grad_loss (n rows) and grad.
inline void check_grad_args(int64_t n, const at::Tensor& student, const at::Tensor& grad_loss,
                            const at::Tensor& grad) {
  check_per_row(grad_loss, "grad_loss", at::kFloat, n, student);
  check_on_device(grad, "grad", student);
  TORCH_CHECK(grad.sizes() == student.sizes(), "kd_loss: grad must have the student's shape ",
              student.sizes(), ", got ", grad.sizes());
  TORCH_CHECK(grad.scalar_type() == student.scalar_type(),
              "kd_loss: grad must have the student's dtype ", student.scalar_type(), ", got ",
              grad.scalar_type());
  check_last_dim(grad, "grad");
}

template <class Backend>
void kd_loss_bwd(const at::Tensor& student, const at::Tensor& teacher,
                 const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& weights,
                 const at::Tensor& stats, const at::Tensor& grad_loss, int64_t divergence,
                 double temperature, double kd_weight, double ce_weight, double mix,
                 int64_t ignore_index, int64_t kd_vocab, double student_scale,
                 double student_softcap, double teacher_scale, double teacher_softcap,
                 at::Tensor& grad) {
  const KDParams p = resolve_params<Backend>(
      student, teacher, labels, weights, divergence, temperature, kd_weight, ce_weight, mix,
      ignore_index, kd_vocab, student_scale, student_softcap, teacher_scale, teacher_softcap);
  check_on_device(stats, "stats", student);
  TORCH_CHECK(stats.scalar_type() == at::kFloat && stats.dim() == 2 && stats.size(0) == p.n &&
                  stats.size(1) == 4 && stats.is_contiguous(),
              "kd_loss: stats must be a contiguous float32 tensor of shape [", p.n,
              ", 4] (from kd_loss_fwd), got ", stats.scalar_type(), " ", stats.sizes());
  check_grad_args(p.n, student, grad_loss, grad);
  if (p.n == 0) return;
  Backend::bwd(p,
               KDGrad{stats.data_ptr<float>(), grad_loss.data_ptr<float>(), grad_loss.stride(0),
                      grad.data_ptr(), grad.stride(0)},
               student.device());
}

// kd_loss_fwd, then kd_loss_bwd with its stats, in one call (docs/design.md §2): the loss,
// the stats and grad = grad_loss · d loss / d student (grad may be the student itself).
template <class Backend>
std::tuple<at::Tensor, at::Tensor> kd_loss_fwd_bwd(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
    const std::optional<at::Tensor>& weights, const at::Tensor& grad_loss, int64_t divergence,
    double temperature, double kd_weight, double ce_weight, double mix, int64_t ignore_index,
    int64_t kd_vocab, double student_scale, double student_softcap, double teacher_scale,
    double teacher_softcap, at::Tensor& grad) {
  const KDParams p = resolve_params<Backend>(
      student, teacher, labels, weights, divergence, temperature, kd_weight, ce_weight, mix,
      ignore_index, kd_vocab, student_scale, student_softcap, teacher_scale, teacher_softcap);
  check_grad_args(p.n, student, grad_loss, grad);
  const auto f32 = student.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({p.n}, f32);
  at::Tensor stats = at::empty({p.n, 4}, f32);
  if (p.n > 0) {
    float* st = stats.data_ptr<float>();
    Backend::fwd_bwd(p,
                     KDGrad{st, grad_loss.data_ptr<float>(), grad_loss.stride(0),
                            grad.data_ptr(), grad.stride(0)},
                     loss.data_ptr<float>(), st, student.device());
  }
  return {loss, stats};
}

}  // namespace fastkd
