// The torch-facing half of fastkd::sparse_kd_loss_fwd / _bwd / _fwd_bwd (a cached top-k
// teacher, docs/design.md §11), as csrc/kd_loss_op.h is for the dense ops, whose checks it
// shares: the checks of ids and logprobs (TORCH_CHECK messages name the argument), the
// resolution of the op's arguments into a SparseParams, and the ops as templates over a backend.
// The schemas (argument order: fastkd._options.SparseKernelArgs) are defined in fastkd/_ops.py.
//
// A backend is a class with
//   static constexpr c10::DeviceType kDevice;  // of the student, hence of every tensor
//   static constexpr int64_t kMaxColumns;      // the widest row its kernels index
//   static void fwd(const SparseParams&, float* loss, float* stats, c10::Device);
//   static void bwd(const SparseParams&, const KDGrad&, c10::Device);
//   static void fwd_bwd(const SparseParams&, const KDGrad&, float* loss, float* stats,
//                       c10::Device);
// as in kd_loss_op.h, with stats [n, 3] = (T lse(x / T), lse(x), D), and not called for n = 0.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "kd_loss_op.h"
#include "kd_params.h"

namespace fastkd {

constexpr int64_t kSparseStats = 3;  // stats columns: T lse(x / T), lse(x), D

// Checks the tensors and scalar arguments the three ops take and resolves them.
template <class Backend>
SparseParams resolve_sparse_params(const at::Tensor& student, const at::Tensor& ids,
                                   const at::Tensor& logprobs,
                                   const std::optional<at::Tensor>& labels,
                                   const std::optional<at::Tensor>& weights, int64_t divergence,
                                   double temperature, double kd_weight, double ce_weight,
                                   double mix, int64_t ignore_index, int64_t tail,
                                   double student_scale, double student_softcap) {
  TORCH_CHECK(student.device().type() == Backend::kDevice, "sparse_kd_loss: student must be a ",
              Backend::kDevice, " tensor, got ", student.device());
  TORCH_CHECK(student.dim() == 2, "sparse_kd_loss: student must be 2-D [N, V], got shape ",
              student.sizes());
  check_last_dim(student, "student");
  TORCH_CHECK(student.size(1) <= Backend::kMaxColumns, "sparse_kd_loss: student has ",
              student.size(1), " columns; the ", Backend::kDevice, " kernels take at most ",
              Backend::kMaxColumns);
  const Dtype dtype = kernel_dtype(student.scalar_type());
  const int64_t n = student.size(0), v = student.size(1);

  check_on_device(ids, "ids", student);
  TORCH_CHECK(ids.scalar_type() == at::kLong, "sparse_kd_loss: ids must be int64, got ",
              ids.scalar_type());
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == n,
              "sparse_kd_loss: ids must have shape [N, k] with the student's N = ", n,
              " rows, got ", ids.sizes());
  check_last_dim(ids, "ids");
  const int64_t k = ids.size(1);
  TORCH_CHECK(k >= 1 && k <= v, "sparse_kd_loss: ids must have k in [1, V = ", v,
              "] columns (k distinct top-k ids of the student's vocabulary), got k = ", k);
  check_on_device(logprobs, "logprobs", student);
  TORCH_CHECK(logprobs.scalar_type() == at::kFloat,
              "sparse_kd_loss: logprobs must be float32, got ", logprobs.scalar_type());
  TORCH_CHECK(logprobs.sizes() == ids.sizes(), "sparse_kd_loss: logprobs must have the shape ",
              ids.sizes(), " of ids, got ", logprobs.sizes());
  check_last_dim(logprobs, "logprobs");
  if (labels) check_per_row(*labels, "labels", at::kLong, n, student);
  if (weights) check_per_row(*weights, "weights", at::kFloat, n, student);

  check_scalars(divergence, temperature, mix, student_softcap, 0.0);
  TORCH_CHECK(tail >= 0 && tail < kNumTails, "sparse_kd_loss: tail code must be in [0, ",
              static_cast<int>(kNumTails), ") (fastkd._options.TAILS), got ", tail);

  SparseParams p{};
  p.student = student.data_ptr();
  p.ids = ids.data_ptr<int64_t>();
  p.logprobs = logprobs.data_ptr<float>();
  p.labels = labels ? labels->data_ptr<int64_t>() : nullptr;
  p.weights = weights ? weights->data_ptr<float>() : nullptr;
  p.n = n;
  p.s_stride = student.stride(0);
  p.id_stride = ids.stride(0);
  p.lp_stride = logprobs.stride(0);
  p.l_stride = labels ? labels->stride(0) : 0;
  p.w_stride = weights ? weights->stride(0) : 0;
  p.ignore_index = ignore_index;
  p.v = v;
  p.k = k;
  p.dtype = dtype;
  p.divergence = static_cast<int>(divergence);
  p.tail = static_cast<int>(tail);
  p.temp = static_cast<float>(temperature);
  p.inv_t = static_cast<float>(1.0 / temperature);
  p.kd_w = static_cast<float>(kd_weight);
  p.ce_w = static_cast<float>(ce_weight);
  const bool mixture = is_mixture(divergence);
  p.mix = {static_cast<float>(mix), mixture ? static_cast<float>(std::log(mix)) : 0.0f,
           mixture ? static_cast<float>(std::log1p(-mix)) : 0.0f};
  p.s_scale = static_cast<float>(student_scale);
  p.s_cap = static_cast<float>(student_softcap);
  p.has_kd = kd_weight != 0;
  p.has_ce = ce_weight != 0 && labels;  // no labels: no CE term (docs/design.md §2)
  return p;
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor> sparse_kd_loss_fwd(
    const at::Tensor& student, const at::Tensor& ids, const at::Tensor& logprobs,
    const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& weights,
    int64_t divergence, double temperature, double kd_weight, double ce_weight, double mix,
    int64_t ignore_index, int64_t tail, double student_scale, double student_softcap) {
  const SparseParams p = resolve_sparse_params<Backend>(
      student, ids, logprobs, labels, weights, divergence, temperature, kd_weight, ce_weight,
      mix, ignore_index, tail, student_scale, student_softcap);
  const auto f32 = student.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({p.n}, f32);
  at::Tensor stats = at::empty({p.n, kSparseStats}, f32);
  if (p.n > 0) Backend::fwd(p, loss.data_ptr<float>(), stats.data_ptr<float>(), student.device());
  return {loss, stats};
}

template <class Backend>
void sparse_kd_loss_bwd(const at::Tensor& student, const at::Tensor& ids,
                        const at::Tensor& logprobs, const std::optional<at::Tensor>& labels,
                        const std::optional<at::Tensor>& weights, const at::Tensor& stats,
                        const at::Tensor& grad_loss, int64_t divergence, double temperature,
                        double kd_weight, double ce_weight, double mix, int64_t ignore_index,
                        int64_t tail, double student_scale, double student_softcap,
                        at::Tensor& grad) {
  const SparseParams p = resolve_sparse_params<Backend>(
      student, ids, logprobs, labels, weights, divergence, temperature, kd_weight, ce_weight,
      mix, ignore_index, tail, student_scale, student_softcap);
  check_on_device(stats, "stats", student);
  TORCH_CHECK(stats.scalar_type() == at::kFloat && stats.dim() == 2 && stats.size(0) == p.n &&
                  stats.size(1) == kSparseStats && stats.is_contiguous(),
              "sparse_kd_loss: stats must be a contiguous float32 tensor of shape [", p.n, ", ",
              kSparseStats, "] (from sparse_kd_loss_fwd), got ", stats.scalar_type(), " ",
              stats.sizes());
  check_grad_args(p.n, student, grad_loss, grad);
  if (p.n == 0) return;
  Backend::bwd(p,
               KDGrad{stats.data_ptr<float>(), grad_loss.data_ptr<float>(), grad_loss.stride(0),
                      grad.data_ptr(), grad.stride(0)},
               student.device());
}

// sparse_kd_loss_fwd, then sparse_kd_loss_bwd with its stats, in one call: the loss, the stats
// and grad = grad_loss · d loss / d student (grad may be the student itself).
template <class Backend>
std::tuple<at::Tensor, at::Tensor> sparse_kd_loss_fwd_bwd(
    const at::Tensor& student, const at::Tensor& ids, const at::Tensor& logprobs,
    const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& weights,
    const at::Tensor& grad_loss, int64_t divergence, double temperature, double kd_weight,
    double ce_weight, double mix, int64_t ignore_index, int64_t tail, double student_scale,
    double student_softcap, at::Tensor& grad) {
  const SparseParams p = resolve_sparse_params<Backend>(
      student, ids, logprobs, labels, weights, divergence, temperature, kd_weight, ce_weight,
      mix, ignore_index, tail, student_scale, student_softcap);
  check_grad_args(p.n, student, grad_loss, grad);
  const auto f32 = student.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({p.n}, f32);
  at::Tensor stats = at::empty({p.n, kSparseStats}, f32);
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
