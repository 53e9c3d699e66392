// CPU kernels of fastkd::kd_loss_fwd and fastkd::kd_loss_bwd. Contract and row math:
// fastkd/_ops.py; executable truth: fastkd/reference.py; the same algorithm as the Triton
// kernels in kernels/kd_loss.py, with the same -inf guards.
//
// Rows are split over ATen's intra-op threads. A row is streamed in tiles of kTile columns,
// each converted to fp32 (logit scale and softcap applied) into one of two stack buffers, so
// every loop after the load runs on L1-resident fp32: the tile's max, then the sums of
// exponentials relative to the running max, the running sums rescaled in double as the max
// moves (online softmax). Two layers: the tile kernels (vectorised loops, vec_math.h for
// exp/log/tanh) are compiled twice, for AVX2+FMA and for the baseline, and picked at load
// time; the row drivers (scalar bookkeeping, one call per tile) are plain code.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>

#include "cpu/vec_math.h"
#include "kd_loss_checks.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTKD_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FASTKD_MULTIVERSION
#endif

namespace fastkd::cpu {
namespace {

constexpr int64_t kTile = 2048;  // two fp32 tiles take 16 KiB of L1

// Element types: how a logit is read as fp32 and how a gradient is written back.
struct F32 {
  using T = float;
  static FASTKD_INLINE float load(float v) { return v; }
  static FASTKD_INLINE float store(float v) { return v; }
};
struct BF16 {
  using T = uint16_t;
  static FASTKD_INLINE float load(uint16_t v) { return bf16_to_float(v); }
  static FASTKD_INLINE uint16_t store(float v) { return float_to_bf16(v); }
};
struct F16 {
  using T = uint16_t;
  static FASTKD_INLINE float load(uint16_t v) { return half_to_float(v); }
  static FASTKD_INLINE uint16_t store(float v) { return float_to_half(v); }
};

// The scalar arguments, checked and resolved once per call.
struct Options {
  int64_t div;
  double temp, kd_w, ce_w, mix;
  float inv_t, log_w1, log_w2;  // log weights of the mixture (jsd, skew divergences)
  int64_t ignore_index, vs, vt, kv;
  float s_scale, s_cap, t_scale, t_cap;  // cap 0: no softcap
  bool has_kd, has_ce;  // a term with weight 0 (CE: or without labels) is skipped
  int ce_pow;           // T when it is 1 or 2 and both terms are on (see kd_sums), else 0
};

// Pointers and strides (in elements) of one call; [N] tensors may be strided.
struct Rows {
  const void* s;
  int64_t s_stride;
  const void* t;
  int64_t t_stride;
  const int64_t* labels;  // nullptr: no labels
  int64_t l_stride;
  const float* weights;  // nullptr: weight 1
  int64_t w_stride;
};

// Running max m and sum s of e^(x - m) over the tiles seen so far.
struct Online {
  float m = -kInf;
  double s = 0.0;
  float ref = 0.0f;      // finite point the current tile's exponentials are relative to
  double rescale = 1.0;  // factor that moved the previous sums to the current max

  void move(float tile_max) {
    const float m_new = std::max(m, tile_max);
    ref = m_new == -kInf ? 0.0f : m_new;  // an all -inf prefix keeps sum 0 without NaN
    rescale = std::exp(static_cast<double>(m) - ref);
    s *= rescale;
    m = m_new;
  }
  double lse() const { return m + std::log(s); }
};

// Per-row values of the backward.
struct RowGrad {
  float la, lb, lc, big_g;   // stats
  float kd_scale, ce_scale;  // w grad_loss kd_weight T, w grad_loss ce_weight
  float ce_factor;           // e^(T la - lc) for the kPow shortcut
};

FASTKD_INLINE float softcap(float x, float cap) {
  return x == -kInf ? x : cap * tanh_f(x / cap);
}

FASTKD_INLINE float transform(float z, float scale, float cap) {
  const float x = z * scale;
  return cap == 0.0f ? x : softcap(x, cap);
}

// log(e^(l1 + lw1) + e^(l2 + lw2)), -inf when both are -inf.
FASTKD_INLINE float log_mix(float l1, float l2, float lw1, float lw2) {
  const float u = l1 + lw1, v = l2 + lw2;
  const float hi = u > v ? u : v, lo = u > v ? v : u;
  const float safe = hi == -kInf ? 0.0f : hi;
  return hi == -kInf ? -kInf : safe + log1p_f(exp_f(lo - safe));
}

// ---- Loop bodies, one instance per divergence (inlined into the tile kernels) ----
//
// With T = 1 or 2 (the default) the CE's e^c needs no exponential of its own on the KD columns:
// c = T a exactly, so e^(c - r_c) = (e^(a - r_a))^T when r_c = T r_a, and
// s1 = e^(c - lse_c) = q^T e^(T lse_a - lse_c). kPow is that T, or 0 (separate exponentials).

// Pass 1 on the KD columns of a tile: the sums of e^(a - ref_a), e^(b - ref_b) (and of
// e^(c - ref_c) when kPow), and for kl (reverse_kl) the sum of e^(b - ref_b) (b - a)
// (of e^(a - ref_a) (a - b)) into acc.
template <int64_t kDiv, int kPow>
FASTKD_INLINE void kd_sums(const float* xs, const float* b, int64_t nk, float inv_t, Online& A,
                           Online& B, Online& C, double& acc) {
  const float ra = A.ref, rb = B.ref;
  float sa = 0.0f, sb = 0.0f, sc = 0.0f, k = 0.0f;
#pragma omp simd reduction(+ : sa, sb, sc, k)
  for (int64_t j = 0; j < nk; ++j) {
    const float a = xs[j] * inv_t;
    const float ea = exp_f(a - ra), eb = exp_f(b[j] - rb);
    sa += ea;
    sb += eb;
    if constexpr (kPow == 1) sc += ea;
    if constexpr (kPow == 2) sc += ea * ea;
    if constexpr (kDiv == kKL) k += b[j] > -kInf ? eb * (b[j] - a) : 0.0f;
    if constexpr (kDiv == kReverseKL) k += a > -kInf ? ea * (a - b[j]) : 0.0f;
  }
  A.s += sa;
  B.s += sb;
  C.s += sc;
  if constexpr (kDiv == kKL) acc = acc * B.rescale + k;
  if constexpr (kDiv == kReverseKL) acc = acc * A.rescale + k;
}

// Pass 2 of the forward (jsd, tvd, skew divergences) on the KD columns of a tile, once the
// log-sum-exps la, lb are known: adds the tile's share of D and of G (fastkd/_ops.py table).
template <int64_t kDiv>
FASTKD_INLINE void kd_terms(const Options& o, const float* xs, const float* b, int64_t nk,
                            float la, float lb, double& d, double& g) {
  const float inv_t = o.inv_t, lw1 = o.log_w1, lw2 = o.log_w2, mix = o.mix;
  float sd = 0.0f, sg = 0.0f;
#pragma omp simd reduction(+ : sd, sg)
  for (int64_t j = 0; j < nk; ++j) {
    const float lq = xs[j] * inv_t - la, lp = b[j] - lb;
    const float q = exp_f(lq), p = exp_f(lp);
    if constexpr (kDiv == kJSD) {  // sd: sum p (lp - lm), sg: sum q (lq - lm)
      const float lm = log_mix(lp, lq, lw1, lw2);
      sd += p > 0.0f ? p * (lp - lm) : 0.0f;
      sg += q > 0.0f ? q * (lq - lm) : 0.0f;
    } else if constexpr (kDiv == kTVD) {
      sd += p > q ? p - q : q - p;
      sg += q > p ? 0.5f * q : (q < p ? -0.5f * q : 0.0f);
    } else if constexpr (kDiv == kSkewKL) {  // q g = -(1 - l) q p / m
      const float lm = log_mix(lp, lq, lw1, lw2);
      sd += p > 0.0f ? p * (lp - lm) : 0.0f;
      const float qg = -(1.0f - mix) * exp_f(lq + lp - lm);
      // q > 0 and p > 0, written as min(q, p) > 0: gcc 12 does not vectorise `a & b` here.
      sg += (q < p ? q : p) > 0.0f ? qg : 0.0f;
    } else {  // kSkewReverseKL: q g = q (lq - lm) - l q^2 / m
      const float lm = log_mix(lq, lp, lw1, lw2);
      const float tq = q > 0.0f ? q * (lq - lm) : 0.0f;
      sd += tq;
      sg += q > 0.0f ? tq - mix * exp_f(2.0f * lq - lm) : 0.0f;
    }
  }
  if constexpr (kDiv == kJSD) {
    d += o.mix * sd + (1.0 - o.mix) * sg;
  } else if constexpr (kDiv == kTVD) {
    d += 0.5 * sd;
  } else {
    d += sd;
  }
  g += sg;
}

// The backward on the KD columns of a tile, written over b:
// b[j] = kd_scale dD/da_j (+ ce_scale s1_j when kPow, see above).
template <int64_t kDiv, int kPow>
FASTKD_INLINE void kd_grad(const Options& o, const RowGrad& r, const float* xs, float* b,
                           int64_t nk) {
  const float inv_t = o.inv_t, lw1 = o.log_w1, lw2 = o.log_w2, mix = o.mix;
  const float la = r.la, lb = r.lb, big_g = r.big_g, kd_scale = r.kd_scale;
  const float ce_q = r.ce_scale * r.ce_factor;
#pragma omp simd
  for (int64_t j = 0; j < nk; ++j) {
    const float lq = xs[j] * inv_t - la, lp = b[j] - lb;
    const float q = exp_f(lq), p = exp_f(lp);
    float dd;
    if constexpr (kDiv == kKL) {
      dd = q - p;
    } else if constexpr (kDiv == kReverseKL) {
      dd = q > 0.0f ? q * (lq - lp - big_g) : 0.0f;
    } else if constexpr (kDiv == kJSD) {
      const float lm = log_mix(lp, lq, lw1, lw2);
      dd = (1.0f - mix) * (q > 0.0f ? q * (lq - lm - big_g) : 0.0f);
    } else if constexpr (kDiv == kTVD) {
      const float h = q > p ? 0.5f : (q < p ? -0.5f : 0.0f);
      dd = q * (h - big_g);
    } else if constexpr (kDiv == kSkewKL) {
      const float lm = log_mix(lp, lq, lw1, lw2);
      const float qg = -(1.0f - mix) * exp_f(lq + lp - lm);
      dd = ((q < p ? q : p) > 0.0f ? qg : 0.0f) - q * big_g;
    } else {  // kSkewReverseKL
      const float lm = log_mix(lq, lp, lw1, lw2);
      const float qg = q * (lq - lm) - mix * exp_f(2.0f * lq - lm);
      dd = q > 0.0f ? qg - q * big_g : 0.0f;
    }
    float v = kd_scale * dd;
    if constexpr (kPow == 1) v += ce_q * q;
    if constexpr (kPow == 2) v += ce_q * (q * q);
    b[j] = v;
  }
}

// ---- Tile kernels (multiversioned) ----

// dst[j] = transform(src[j]) * post (post = 1/T for the teacher's b = x_t / T).
template <class E>
FASTKD_MULTIVERSION void load_tile(const typename E::T* src, int64_t n, float scale, float cap,
                                   float post, float* dst) {
  if (cap == 0.0f) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) dst[j] = E::load(src[j]) * scale * post;
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) dst[j] = softcap(E::load(src[j]) * scale, cap) * post;
  }
}

// grad = g * d x_s / d z_s in the student dtype, 0 where z_s = -inf.
template <class E>
FASTKD_MULTIVERSION void store_grad(const float* g, const float* xs, int64_t n, float scale,
                                    float cap, typename E::T* dst) {
  if (cap == 0.0f) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const float v = g[j] * scale;
      dst[j] = E::store(xs[j] == -kInf ? 0.0f : v);
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const float r = xs[j] / cap;
      const float v = g[j] * (scale * (1.0f - r * r));
      dst[j] = E::store(xs[j] == -kInf ? 0.0f : v);
    }
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
  for (int64_t j = 0; j < n; ++j) s += exp_f(x[j] - ref);
  return s;
}

// g[j] += ce_scale * e^(x[j] - lc): the CE's s1 term of the gradient.
FASTKD_MULTIVERSION void add_ce_grad(float* g, const float* x, int64_t n, float lc,
                                     float ce_scale) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) g[j] += ce_scale * exp_f(x[j] - lc);
}

// Runtime divergence code and power -> the loops compiled for them (switches, not lambdas:
// a lambda would be a function of its own, outside the clone's instruction set).
template <int64_t kDiv>
FASTKD_INLINE void kd_sums_pow(int pow, const float* xs, const float* b, int64_t nk, float inv_t,
                               Online& A, Online& B, Online& C, double& acc) {
  switch (pow) {
    case 1: return kd_sums<kDiv, 1>(xs, b, nk, inv_t, A, B, C, acc);
    case 2: return kd_sums<kDiv, 2>(xs, b, nk, inv_t, A, B, C, acc);
    default: return kd_sums<kDiv, 0>(xs, b, nk, inv_t, A, B, C, acc);
  }
}

FASTKD_MULTIVERSION void kd_sums_any(int64_t div, int pow, const float* xs, const float* b,
                                     int64_t nk, float inv_t, Online& A, Online& B, Online& C,
                                     double& acc) {
  switch (div) {
    case kKL: return kd_sums_pow<kKL>(pow, xs, b, nk, inv_t, A, B, C, acc);
    case kReverseKL: return kd_sums_pow<kReverseKL>(pow, xs, b, nk, inv_t, A, B, C, acc);
    default: return kd_sums_pow<-1>(pow, xs, b, nk, inv_t, A, B, C, acc);
  }
}

FASTKD_MULTIVERSION void kd_terms_any(const Options& o, const float* xs, const float* b,
                                      int64_t nk, float la, float lb, double& d, double& g) {
  switch (o.div) {
    case kJSD: return kd_terms<kJSD>(o, xs, b, nk, la, lb, d, g);
    case kTVD: return kd_terms<kTVD>(o, xs, b, nk, la, lb, d, g);
    case kSkewKL: return kd_terms<kSkewKL>(o, xs, b, nk, la, lb, d, g);
    default: return kd_terms<kSkewReverseKL>(o, xs, b, nk, la, lb, d, g);
  }
}

template <int64_t kDiv>
FASTKD_INLINE void kd_grad_pow(const Options& o, const RowGrad& r, const float* xs, float* b,
                               int64_t nk) {
  switch (o.ce_pow) {
    case 1: return kd_grad<kDiv, 1>(o, r, xs, b, nk);
    case 2: return kd_grad<kDiv, 2>(o, r, xs, b, nk);
    default: return kd_grad<kDiv, 0>(o, r, xs, b, nk);
  }
}

FASTKD_MULTIVERSION void kd_grad_any(const Options& o, const RowGrad& r, const float* xs,
                                     float* b, int64_t nk) {
  switch (o.div) {
    case kKL: return kd_grad_pow<kKL>(o, r, xs, b, nk);
    case kReverseKL: return kd_grad_pow<kReverseKL>(o, r, xs, b, nk);
    case kJSD: return kd_grad_pow<kJSD>(o, r, xs, b, nk);
    case kTVD: return kd_grad_pow<kTVD>(o, r, xs, b, nk);
    case kSkewKL: return kd_grad_pow<kSkewKL>(o, r, xs, b, nk);
    default: return kd_grad_pow<kSkewReverseKL>(o, r, xs, b, nk);
  }
}

// ---- Row drivers ----

// b = x_t / T on the tile's nk KD columns; -inf past the teacher's vocabulary (vocab='pad').
template <class E>
void load_teacher(const Options& o, const typename E::T* t, int64_t j0, int64_t nk, float* b) {
  const int64_t nt = std::clamp<int64_t>(o.vt - j0, 0, nk);
  load_tile<E>(t + j0, nt, o.t_scale, o.t_cap, o.inv_t, b);
  std::fill(b + nt, b + nk, -kInf);
}

// Row weight (0 for an ignored label) and label of row i.
float row_weight(const Options& o, const Rows& r, int64_t i, int64_t& label) {
  const float w = r.weights ? r.weights[i * r.w_stride] : 1.0f;
  label = r.labels ? r.labels[i * r.l_stride] : 0;
  return r.labels && label == o.ignore_index ? 0.0f : w;
}

template <class E>
void fwd_row(const Options& o, const typename E::T* s, const typename E::T* t, int64_t y, float w,
             float* loss, float* stats, float* xs, float* b) {
  Online A, B, C;
  double acc = 0.0;
  const int64_t cols = o.has_ce ? o.vs : (o.has_kd ? o.kv : 0);
  for (int64_t j0 = 0; j0 < cols; j0 += kTile) {
    const int64_t n = std::min(kTile, cols - j0);
    const int64_t nk = o.has_kd ? std::clamp<int64_t>(o.kv - j0, 0, n) : 0;
    load_tile<E>(s + j0, n, o.s_scale, o.s_cap, 1.0f, xs);
    const float max_kd = tile_max(xs, nk);  // -inf when nk = 0
    if (o.has_ce) C.move(std::max(max_kd, tile_max(xs + nk, n - nk)));
    int pow = 0;
    if (nk > 0) {
      load_teacher<E>(o, t, j0, nk, b);
      A.move(max_kd * o.inv_t);  // max(x) / T == max(x / T): T > 0
      B.move(tile_max(b, nk));
      // A tile of KD columns only: so were all before it, hence r_c = T r_a exactly (x / T is
      // exact and monotone for T in {1, 2}) and the kPow shortcut applies.
      pow = nk == n ? o.ce_pow : 0;
      kd_sums_any(o.div, pow, xs, b, nk, o.inv_t, A, B, C, acc);
    }
    if (o.has_ce && pow == 0) C.s += sum_exp(xs, n, C.ref);
  }

  float la = 0.0f, lb = 0.0f, lc = 0.0f, big_g = 0.0f;
  double total = 0.0;
  if (o.has_kd) {
    la = static_cast<float>(A.lse());
    lb = static_cast<float>(B.lse());
    double d = 0.0, g = 0.0;
    if (o.div == kKL) {
      d = acc / B.s - B.lse() + A.lse();
    } else if (o.div == kReverseKL) {
      d = g = acc / A.s - A.lse() + B.lse();
    } else {
      for (int64_t j0 = 0; j0 < o.kv; j0 += kTile) {
        const int64_t nk = std::min(kTile, o.kv - j0);
        load_tile<E>(s + j0, nk, o.s_scale, o.s_cap, 1.0f, xs);
        load_teacher<E>(o, t, j0, nk, b);
        kd_terms_any(o, xs, b, nk, la, lb, d, g);
      }
    }
    big_g = static_cast<float>(g);
    total = o.kd_w * o.temp * o.temp * d;
  }
  if (o.has_ce) {
    const double lse_c = C.lse();
    lc = static_cast<float>(lse_c);
    // An out-of-range label gives NaN (the contract: no host check on the device).
    const bool valid = y >= 0 && y < o.vs;
    const double ce = valid ? lse_c - transform(E::load(s[y]), o.s_scale, o.s_cap)
                            : std::numeric_limits<double>::quiet_NaN();
    total += o.ce_w * ce;
  }
  *loss = static_cast<float>(w * total);
  stats[0] = la;
  stats[1] = lb;
  stats[2] = lc;
  stats[3] = big_g;
}

template <class E>
void bwd_row(const Options& o, const typename E::T* s, const typename E::T* t, int64_t y,
             double scale, const float* stats, typename E::T* grad, float* xs, float* g) {
  RowGrad r;
  r.la = stats[0];
  r.lb = stats[1];
  r.lc = stats[2];
  r.big_g = stats[3];
  r.kd_scale = static_cast<float>(scale * o.kd_w * o.temp);
  r.ce_scale = static_cast<float>(scale * o.ce_w);
  r.ce_factor =
      o.ce_pow ? static_cast<float>(std::exp(o.ce_pow * static_cast<double>(r.la) - r.lc)) : 0.0f;
  for (int64_t j0 = 0; j0 < o.vs; j0 += kTile) {
    const int64_t n = std::min(kTile, o.vs - j0);
    const int64_t nk = o.has_kd ? std::clamp<int64_t>(o.kv - j0, 0, n) : 0;
    // The whole student tile is read here, before grad (possibly the same memory) is written.
    load_tile<E>(s + j0, n, o.s_scale, o.s_cap, 1.0f, xs);
    if (nk > 0) {
      load_teacher<E>(o, t, j0, nk, g);
      kd_grad_any(o, r, xs, g, nk);
    }
    std::fill(g + nk, g + n, 0.0f);
    if (o.has_ce) {
      const int64_t from = o.ce_pow ? nk : 0;  // kd_grad added s1 on the KD columns
      add_ce_grad(g + from, xs + from, n - from, r.lc, r.ce_scale);
      if (y >= j0 && y < j0 + n) g[y - j0] -= r.ce_scale;
    }
    store_grad<E>(g, xs, n, o.s_scale, o.s_cap, grad + j0);
  }
}

template <class E>
void fwd_rows(const Options& o, const Rows& r, float* loss, float* stats, int64_t begin,
              int64_t end) {
  using T = typename E::T;
  alignas(64) float xs[kTile];
  alignas(64) float b[kTile];
  for (int64_t i = begin; i < end; ++i) {
    int64_t y;
    const float w = row_weight(o, r, i, y);
    if (w == 0.0f) {  // the row is not read
      loss[i] = 0.0f;
      std::fill(stats + 4 * i, stats + 4 * i + 4, 0.0f);
      continue;
    }
    fwd_row<E>(o, static_cast<const T*>(r.s) + i * r.s_stride,
               static_cast<const T*>(r.t) + i * r.t_stride, y, w, loss + i, stats + 4 * i, xs, b);
  }
}

template <class E>
void bwd_rows(const Options& o, const Rows& r, const float* stats, const float* grad_loss,
              int64_t gl_stride, void* grad, int64_t g_stride, int64_t begin, int64_t end) {
  using T = typename E::T;
  alignas(64) float xs[kTile];
  alignas(64) float g[kTile];
  for (int64_t i = begin; i < end; ++i) {
    T* grad_row = static_cast<T*>(grad) + i * g_stride;
    int64_t y;
    const float w = row_weight(o, r, i, y);
    if (w == 0.0f) {
      std::memset(grad_row, 0, o.vs * sizeof(T));  // +0 is all zero bits in every dtype
      continue;
    }
    const double scale = static_cast<double>(w) * grad_loss[i * gl_stride];
    bwd_row<E>(o, static_cast<const T*>(r.s) + i * r.s_stride,
               static_cast<const T*>(r.t) + i * r.t_stride, y, scale, stats + 4 * i, grad_row,
               xs, g);
  }
}

// Rows per parallel task: enough columns that a task outweighs its scheduling.
int64_t grain_rows(int64_t vs) { return std::max<int64_t>(1, (int64_t{1} << 15) / vs); }

// Calls f(E{}) with the element type of the logits.
template <class F>
void with_dtype(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: return f(F32{});
    case at::kBFloat16: return f(BF16{});
    default: return f(F16{});  // kHalf: the only other dtype the checks let through
  }
}

// Checks the inputs both ops share and resolves the scalar arguments.
Options checked_options(const at::Tensor& student, const at::Tensor& teacher,
                        const std::optional<at::Tensor>& labels,
                        const std::optional<at::Tensor>& weights, int64_t divergence,
                        double temperature, double kd_weight, double ce_weight, double mix,
                        int64_t ignore_index, int64_t kd_vocab, double student_scale,
                        double student_softcap, double teacher_scale, double teacher_softcap) {
  TORCH_CHECK(student.device().is_cpu(), "kd_loss: student must be a CPU tensor, got ",
              student.device());
  fastkd::check_inputs(student, teacher, labels, weights, divergence, temperature, mix, kd_vocab,
                       student_softcap, teacher_softcap);
  const bool mixture = is_mixture(divergence);
  Options o;
  o.div = divergence;
  o.temp = temperature;
  o.kd_w = kd_weight;
  o.ce_w = ce_weight;
  o.mix = mix;
  o.inv_t = static_cast<float>(1.0 / temperature);
  o.log_w1 = mixture ? static_cast<float>(std::log(mix)) : 0.0f;
  o.log_w2 = mixture ? static_cast<float>(std::log1p(-mix)) : 0.0f;
  o.ignore_index = ignore_index;
  o.vs = student.size(1);
  o.vt = teacher.size(1);
  o.kv = kd_vocab;
  o.s_scale = static_cast<float>(student_scale);
  o.s_cap = static_cast<float>(student_softcap);
  o.t_scale = static_cast<float>(teacher_scale);
  o.t_cap = static_cast<float>(teacher_softcap);
  o.has_kd = kd_weight != 0;
  o.has_ce = ce_weight != 0 && labels;  // no labels: no CE term (_ops.py)
  o.ce_pow = o.has_kd && o.has_ce && (temperature == 1.0 || temperature == 2.0)
                 ? static_cast<int>(temperature)
                 : 0;
  return o;
}

Rows make_rows(const at::Tensor& student, const at::Tensor& teacher,
               const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& weights) {
  return Rows{student.data_ptr(),
              student.stride(0),
              teacher.data_ptr(),
              teacher.stride(0),
              labels ? labels->data_ptr<int64_t>() : nullptr,
              labels ? labels->stride(0) : 0,
              weights ? weights->data_ptr<float>() : nullptr,
              weights ? weights->stride(0) : 0};
}

std::tuple<at::Tensor, at::Tensor> kd_loss_fwd(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
    const std::optional<at::Tensor>& weights, int64_t divergence, double temperature,
    double kd_weight, double ce_weight, double mix, int64_t ignore_index, int64_t kd_vocab,
    double student_scale, double student_softcap, double teacher_scale, double teacher_softcap) {
  const Options o = checked_options(student, teacher, labels, weights, divergence, temperature,
                                    kd_weight, ce_weight, mix, ignore_index, kd_vocab,
                                    student_scale, student_softcap, teacher_scale,
                                    teacher_softcap);
  const int64_t n = student.size(0);
  const auto f32 = student.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({n}, f32);
  at::Tensor stats = at::empty({n, 4}, f32);
  const Rows r = make_rows(student, teacher, labels, weights);
  float* loss_p = loss.data_ptr<float>();
  float* stats_p = stats.data_ptr<float>();
  with_dtype(student.scalar_type(), [&](auto e) {
    at::parallel_for(0, n, grain_rows(o.vs), [&](int64_t begin, int64_t end) {
      fwd_rows<decltype(e)>(o, r, loss_p, stats_p, begin, end);
    });
  });
  return {loss, stats};
}

void kd_loss_bwd(const at::Tensor& student, const at::Tensor& teacher,
                 const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& weights,
                 const at::Tensor& stats, const at::Tensor& grad_loss, int64_t divergence,
                 double temperature, double kd_weight, double ce_weight, double mix,
                 int64_t ignore_index, int64_t kd_vocab, double student_scale,
                 double student_softcap, double teacher_scale, double teacher_softcap,
                 at::Tensor& grad) {
  const Options o = checked_options(student, teacher, labels, weights, divergence, temperature,
                                    kd_weight, ce_weight, mix, ignore_index, kd_vocab,
                                    student_scale, student_softcap, teacher_scale,
                                    teacher_softcap);
  check_grad_inputs(student, stats, grad_loss, grad);
  const int64_t n = student.size(0);

  const Rows r = make_rows(student, teacher, labels, weights);
  const float* stats_p = stats.data_ptr<float>();
  const float* gl_p = grad_loss.data_ptr<float>();
  const int64_t gl_stride = grad_loss.stride(0);
  void* grad_p = grad.data_ptr();
  const int64_t g_stride = grad.stride(0);
  with_dtype(student.scalar_type(), [&](auto e) {
    at::parallel_for(0, n, grain_rows(o.vs), [&](int64_t begin, int64_t end) {
      bwd_rows<decltype(e)>(o, r, stats_p, gl_p, gl_stride, grad_p, g_stride, begin, end);
    });
  });
}

}  // namespace
}  // namespace fastkd::cpu

// The schemas are defined in fastkd/_ops.py.
TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("kd_loss_fwd", &fastkd::cpu::kd_loss_fwd);
  m.impl("kd_loss_bwd", &fastkd::cpu::kd_loss_bwd);
}
