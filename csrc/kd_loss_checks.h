// The input checks fastkd::kd_loss_fwd / kd_loss_bwd run on every device, with TORCH_CHECK
// messages that name the argument. Each backend checks the student's device itself and adds its
// own limits; every other tensor must be on the student's device. Contract: fastkd/_ops.py.
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>
#include <optional>
#include <utility>

#include "kd_loss_codes.h"

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

// The tensors and scalar arguments both ops take.
inline void check_inputs(const at::Tensor& student, const at::Tensor& teacher,
                         const std::optional<at::Tensor>& labels,
                         const std::optional<at::Tensor>& weights, int64_t divergence,
                         double temperature, double mix, int64_t kd_vocab,
                         double student_softcap, double teacher_softcap) {
  check_on_device(teacher, "teacher", student);
  for (const auto& [x, name] : {std::pair{&student, "student"}, std::pair{&teacher, "teacher"}}) {
    TORCH_CHECK(x->dim() == 2, "kd_loss: ", name, " must be 2-D [N, V], got shape ", x->sizes());
    check_last_dim(*x, name);
  }
  const auto dtype = student.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "kd_loss: student must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(teacher.scalar_type() == dtype, "kd_loss: teacher must have the student's dtype ",
              dtype, ", got ", teacher.scalar_type());
  const int64_t n = student.size(0), vs = student.size(1);
  TORCH_CHECK(teacher.size(0) == n, "kd_loss: teacher has ", teacher.size(0),
              " rows but student has ", n);
  if (labels) check_per_row(*labels, "labels", at::kLong, n, student);
  if (weights) check_per_row(*weights, "weights", at::kFloat, n, student);
  TORCH_CHECK(divergence >= 0 && divergence < kNumDivergences,
              "kd_loss: divergence code must be in [0, ", static_cast<int>(kNumDivergences),
              "), got ", divergence);
  TORCH_CHECK(temperature > 0 && std::isfinite(temperature),
              "kd_loss: temperature must be finite and > 0, got ", temperature);
  TORCH_CHECK(kd_vocab >= 1 && kd_vocab <= vs, "kd_loss: kd_vocab must be in [1, ", vs,
              "] (the student vocabulary), got ", kd_vocab);
  TORCH_CHECK(!is_mixture(divergence) || (mix > 0 && mix < 1),
              "kd_loss: mix (beta or skew) must be in (0, 1) for divergence code ", divergence,
              ", got ", mix);
  TORCH_CHECK(student_softcap >= 0 && teacher_softcap >= 0,
              "kd_loss: softcaps must be >= 0 (0: none), got ", student_softcap, " and ",
              teacher_softcap);
}

// The tensors only kd_loss_bwd takes: the forward's stats, grad_loss and the gradient's buffer.
inline void check_grad_inputs(const at::Tensor& student, const at::Tensor& stats,
                              const at::Tensor& grad_loss, const at::Tensor& grad) {
  const int64_t n = student.size(0);
  check_on_device(stats, "stats", student);
  TORCH_CHECK(stats.scalar_type() == at::kFloat && stats.dim() == 2 && stats.size(0) == n &&
                  stats.size(1) == 4 && stats.is_contiguous(),
              "kd_loss: stats must be a contiguous float32 tensor of shape [", n,
              ", 4] (from kd_loss_fwd), got ", stats.scalar_type(), " ", stats.sizes());
  check_per_row(grad_loss, "grad_loss", at::kFloat, n, student);
  check_on_device(grad, "grad", student);
  TORCH_CHECK(grad.sizes() == student.sizes(), "kd_loss: grad must have the student's shape ",
              student.sizes(), ", got ", grad.sizes());
  TORCH_CHECK(grad.scalar_type() == student.scalar_type(),
              "kd_loss: grad must have the student's dtype ", student.scalar_type(), ", got ",
              grad.scalar_type());
  check_last_dim(grad, "grad");
}

}  // namespace fastkd
