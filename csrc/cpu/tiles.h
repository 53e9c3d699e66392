// The pieces the CPU kernels share (csrc/cpu/kd_loss.cpp, csrc/cpu/sparse_kd_loss.cpp): the
// element types, the online softmax over tiles, the multiversioned tile kernels that load a
// tile into fp32, store a gradient tile, take a tile's max and sums of exponentials and add the
// CE's gradient, and the row loop over ATen's threads (docs/design.md §5).
//
// Everything here has internal linkage (an unnamed namespace): each kernel file gets its own
// target_clones copies, whose load-time resolvers are never merged across translation units.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cpu/vec_math.h"
#include "kd_math.h"
#include "kd_params.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// AVX-512 (x86-64-v4): 32 vector registers, no spills in the exp-heavy loops; ~1.4x the AVX2
// clone's exponentials per cycle on AMD Zen 4.
#define FASTKD_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTKD_MULTIVERSION
#endif

namespace fastkd::cpu {
namespace {

using M = CpuMath;
constexpr int64_t kTile = 2048;  // two fp32 tiles take 16 KiB of L1

// Element types: how a logit is read as fp32 and how a gradient is written back.
struct F32 {
  using T = float;
  static FASTKD_HD float load(float v) { return v; }
  static FASTKD_HD float store(float v) { return v; }
};
struct BF16 {
  using T = uint16_t;
  static FASTKD_HD float load(uint16_t v) { return bf16_to_float(v); }
  static FASTKD_HD uint16_t store(float v) { return float_to_bf16(v); }
};
struct F16 {
  using T = uint16_t;
  static FASTKD_HD float load(uint16_t v) { return half_to_float(v); }
  static FASTKD_HD uint16_t store(float v) { return float_to_half(v); }
};

// Running max m and sum s of e^((x - m) inv_t) over the tiles seen so far, with m and the
// tiles' x in logit units: the softmax of x / T (inv_t = 1 / T; 1 for the CE's) without
// forming x / T, which overflows where T < 1 and |x| is near the fp32 maximum.
struct Online {
  double inv_t = 1.0;
  float m = -kInf;
  double s = 0.0;
  float ref = 0.0f;      // finite point the current tile's exponentials are relative to
  double rescale = 1.0;  // factor that moved the previous sums to the current max

  void move(float tile_max) {
    const float m_new = std::max(m, tile_max);
    ref = m_new == -kInf ? 0.0f : m_new;  // an all -inf prefix keeps sum 0 without NaN
    rescale = std::exp((static_cast<double>(m) - ref) * inv_t);
    s *= rescale;
    m = m_new;
  }
  double lse() const { return m * inv_t + std::log(s); }  // lse(x / T), in double
  float stat() const { return static_cast<float>(m + std::log(s) / inv_t); }  // T lse(x / T)
};

// (x - r) / T for x <= r (r: a running max or a stats' T lse). The fast loops take it as
// x inv_t - rs with rs = r inv_t (one FMA), off by the rounding of rs, under 1/16 where
// |rs| <= 2^20. kWide (is_wide: larger |r / T|, which may leave the fp32 range where T < 1):
// as written, <= 0 and never overflowing.
template <bool kWide>
FASTKD_HD float over_t(float x, float r, float rs, float inv_t) {
  return kWide ? (x - r) * inv_t : x * inv_t - rs;
}

// Whether over_t needs kWide for the references r1, r2.
bool is_wide(float r1, float r2, float inv_t) {
  return !(std::max(std::fabs(r1), std::fabs(r2)) * inv_t <= 0x1p20f);
}

// ---- Tile kernels (multiversioned) ----

// dst[j] = x = transform(src[j]).
template <class E>
FASTKD_MULTIVERSION void load_tile(const typename E::T* src, int64_t n, float scale, float cap,
                                   float* dst) {
  if (cap == 0.0f) {  // a literal 0: no tanh in the loop
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) dst[j] = transform<M>(E::load(src[j]), scale, 0.0f);
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) dst[j] = transform<M>(E::load(src[j]), scale, cap);
  }
}

// grad = g * d x_s / d z_s in the student dtype, 0 where z_s = -inf.
template <class E>
FASTKD_MULTIVERSION void store_grad(const float* g, const float* xs, int64_t n, float scale,
                                    float cap, typename E::T* dst) {
  if (cap == 0.0f) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) dst[j] = E::store(transform_grad(g[j], xs[j], scale, 0.0f));
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) dst[j] = E::store(transform_grad(g[j], xs[j], scale, cap));
  }
}

FASTKD_MULTIVERSION float tile_max(const float* x, int64_t n) {
  float m = -kInf;
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

FASTKD_MULTIVERSION float sum_exp(const float* x, int64_t n, float ref) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += M::exp(x[j] - ref);
  return s;
}

// g[j] += ce_scale * dCE/dc_j with s1_j = e^(x[j] - lc); label: the label's j, -1 if none. The
// label's column is redone after the loop, the same arithmetic: a compare in the loop would
// cost 4% of the backward.
FASTKD_MULTIVERSION void add_ce_grad(float* g, const float* x, int64_t n, float lc,
                                     float ce_scale, int64_t label) {
  const float g_label = label >= 0 ? g[label] : 0.0f;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) g[j] += ce_scale * ce_grad(M::exp(x[j] - lc), false);
  if (label >= 0) g[label] = g_label + ce_scale * ce_grad(M::exp(x[label] - lc), true);
}

// Calls at::parallel_for over n rows of `cols` columns with f(E{}, begin, end), E the element
// type of the logits; a task takes enough columns to outweigh its scheduling.
template <class F>
void for_rows(int64_t n, int64_t cols, Dtype dtype, F&& f) {
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / cols);
  const auto run = [&](auto e) {
    at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) { f(e, begin, end); });
  };
  switch (dtype) {
    case Dtype::kFloat32: return run(F32{});
    case Dtype::kBFloat16: return run(BF16{});
    case Dtype::kFloat16: return run(F16{});
  }
}


}  // namespace
}  // namespace fastkd::cpu
