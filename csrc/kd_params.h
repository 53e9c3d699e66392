// One call of fastkd::kd_loss_fwd / kd_loss_bwd as every native backend takes it: pointers,
// strides and the checked, resolved scalar arguments (docs/design.md §2). csrc/kd_loss_op.h
// fills it from the op's arguments; the CPU kernels and the CUDA launchers read it. Plain C++,
// so nvcc compiles the CUDA kernels against it where torch has no CUDA.
#pragma once

#include <cstdint>

#include "kd_math.h"

namespace fastkd {

enum class Dtype { kFloat32, kBFloat16, kFloat16 };  // of student, teacher and grad

// Strides are in elements; the columns of student, teacher and grad are contiguous.
struct KDParams {
  const void* student;    // [n, vs]
  const void* teacher;    // [n, vt]; columns >= min(vt, kv) read as -inf (vocab='pad')
  const int64_t* labels;  // [n] or nullptr
  const float* weights;   // [n] or nullptr (weight 1)
  int64_t n, s_stride, t_stride, l_stride, w_stride;
  int64_t ignore_index;
  int64_t vs, vt, kv;  // student, teacher and KD vocabularies
  Dtype dtype;
  int divergence;  // Divergence
  float temp, inv_t, kd_w, ce_w;
  Mixture mix;
  float s_scale, s_cap, t_scale, t_cap;  // cap 0: no softcap
  bool has_kd, has_ce;  // kd_w != 0; ce_w != 0 with labels: a term with weight 0 is skipped
};

// What kd_loss_bwd takes beyond KDParams: the forward's stats (contiguous [n, 4]), grad_loss
// ([n], stride gl_stride) and the gradient's buffer ([n, vs], row stride g_stride; may be the
// student itself).
struct KDGrad {
  const float* stats;
  const float* grad_loss;
  int64_t gl_stride;
  void* grad;
  int64_t g_stride;
};

// One call of fastkd::sparse_kd_loss_fwd / sparse_kd_loss_bwd (a cached top-k teacher,
// docs/design.md §11): KDParams' fields less the teacher and kd_vocab, plus the teacher's top-k
// ids and log-probabilities and the tail mode. csrc/sparse_kd_loss_op.h fills it.
struct SparseParams {
  const void* student;    // [n, v]
  const int64_t* ids;     // [n, k], row stride id_stride; any value (checked before a read)
  const float* logprobs;  // [n, k], row stride lp_stride
  const int64_t* labels;  // [n] or nullptr
  const float* weights;   // [n] or nullptr (weight 1)
  int64_t n, s_stride, id_stride, lp_stride, l_stride, w_stride;
  int64_t ignore_index;
  int64_t v, k;  // student vocabulary, cached ids per row (1 <= k <= v)
  Dtype dtype;
  int divergence;  // Divergence
  int tail;        // Tail
  float temp, inv_t, kd_w, ce_w;
  Mixture mix;
  float s_scale, s_cap;  // cap 0: no softcap
  bool has_kd, has_ce;   // as in KDParams
};

// The weight of row i (0 for an ignored label) and its label; P: KDParams or SparseParams.
template <class P>
FASTKD_HD float row_weight(const P& p, int64_t i, int64_t& label) {
  const float w = p.weights ? p.weights[i * p.w_stride] : 1.0f;
  label = p.labels ? p.labels[i * p.l_stride] : 0;
  return p.labels && label == p.ignore_index ? 0.0f : w;
}

}  // namespace fastkd
