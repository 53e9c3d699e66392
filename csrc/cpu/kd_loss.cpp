// CPU kernels of fastkd::kd_loss_fwd and fastkd::kd_loss_bwd: the backend CpuBackend of the ops
// in csrc/kd_loss_op.h (docs/design.md §2). The per-column math is csrc/kd_math.h's, the CUDA
// kernels' (docs/design.md §3), with CpuMath's vectorisable exp/log1p/tanh; the algorithm is the
// one of the Triton kernels in kernels/kd_loss.py. Executable truth: fastkd/reference.py.
//
// Rows are split over ATen's intra-op threads. A row is streamed in tiles of kTile columns,
// each converted to fp32 (logit scale and softcap applied) into one of two stack buffers, so
// every loop after the load runs on L1-resident fp32: the tile's max, then the sums of
// exponentials relative to the running max, the running sums rescaled in double as the max
// moves (online softmax). Two layers: the tile kernels (vectorised loops calling the element
// functions) are compiled twice, for AVX2+FMA and for the baseline, and picked at load time;
// the row drivers (scalar bookkeeping, one call per tile) are plain code.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "cpu/vec_math.h"
#include "kd_loss_op.h"
#include "kd_math.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTKD_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
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

// T when it is 1 or 2 and both terms are on (the kPow shortcut, see kd_sums), else 0.
int ce_pow(const KDParams& p) {
  return p.has_kd && p.has_ce && (p.temp == 1.0f || p.temp == 2.0f) ? static_cast<int>(p.temp)
                                                                      : 0;
}

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
  int label;  // the label's column in the current tile, -1 if not in it (int: vectorises on SSE2)
};

// ---- Loop bodies, one instance per divergence (inlined into the tile kernels) ----
//
// With T = 1 or 2 (the default) the CE's e^c needs no exponential of its own on the KD columns:
// c = T a exactly, so e^(c - r_c) = (e^(a - r_a))^T when r_c = T r_a, and
// s1 = e^(c - lse_c) = q^T e^(T lse_a - lse_c). kPow is that T, or 0 (separate exponentials).

// Pass 1 on the KD columns of a tile: the sums of e^(a - ref_a), e^(b - ref_b) (and of
// e^(c - ref_c) when kPow), and for kl (reverse_kl) the sum of e^(b - ref_b) (b - a)
// (of e^(a - ref_a) (a - b)) into acc.
template <int kDiv, int kPow>
FASTKD_HD void kd_sums(const float* xs, const float* b, int64_t nk, float inv_t, Online& A,
                       Online& B, Online& C, double& acc) {
  const float ra = A.ref, rb = B.ref;
  float sa = 0.0f, sb = 0.0f, sc = 0.0f, k = 0.0f;
#pragma omp simd reduction(+ : sa, sb, sc, k)
  for (int64_t j = 0; j < nk; ++j) {
    const float a = xs[j] * inv_t;
    const float ea = M::exp(a - ra), eb = M::exp(b[j] - rb);
    sa += ea;
    sb += eb;
    if constexpr (kPow == 1) sc += ea;
    if constexpr (kPow == 2) sc += ea * ea;
    k += one_pass_term<kDiv>(a, b[j], ea, eb);
  }
  A.s += sa;
  B.s += sb;
  C.s += sc;
  if constexpr (kDiv == kKL) acc = acc * B.rescale + k;
  if constexpr (kDiv == kReverseKL) acc = acc * A.rescale + k;
}

// Pass 2 of the forward (jsd, tvd, skew divergences) on the KD columns of a tile, once the
// log-sum-exps la, lb are known: adds the tile's sums of two_pass_terms to sum_d, sum_g.
template <int kDiv>
FASTKD_HD void kd_terms(const KDParams& p, const float* xs, const float* b, int64_t nk, float la,
                        float lb, double& sum_d, double& sum_g) {
  const float inv_t = p.inv_t;
  const Mixture w = p.mix;
  float sd = 0.0f, sg = 0.0f;
#pragma omp simd reduction(+ : sd, sg)
  for (int64_t j = 0; j < nk; ++j) {
    const float lq = xs[j] * inv_t - la, lp = b[j] - lb;
    const Terms t = two_pass_terms<M, kDiv>(lq, lp, M::exp(lq), M::exp(lp), w);
    sd += t.d;
    sg += t.g;
  }
  sum_d += sd;
  sum_g += sg;
}

// The backward on the KD columns of a tile, written over b: b[j] = kd_scale dD/da_j, plus
// ce_scale dCE/dc_j with s1_j = q_j^T e^(T la - lc) when kPow (see above).
template <int kDiv, int kPow>
FASTKD_HD void kd_grad_tile(const KDParams& p, const RowGrad& r, const float* xs, float* b,
                            int64_t nk) {
  const float inv_t = p.inv_t, la = r.la, lb = r.lb, big_g = r.big_g;
  const float kd_scale = r.kd_scale, ce_scale = r.ce_scale, ce_factor = r.ce_factor;
  const int label = r.label;
  const Mixture w = p.mix;
#pragma omp simd
  for (int j = 0; j < nk; ++j) {
    const float lq = xs[j] * inv_t - la, lp = b[j] - lb;
    const float q = M::exp(lq);
    const float dd = kd_grad<M, kDiv>(lq, lp, q, M::exp(lp), big_g, w);
    if constexpr (kPow == 0) {  // add_ce_grad adds the CE term
      b[j] = kd_scale * dd;
    } else {
      const float s1 = (kPow == 1 ? q : q * q) * ce_factor;
      b[j] = logit_grad(kd_scale, dd, ce_scale, ce_grad(s1, j == label));
    }
  }
}

// ---- Tile kernels (multiversioned) ----

// dst[j] = transform(src[j]) * post (post = 1/T for the teacher's b = x_t / T).
template <class E>
FASTKD_MULTIVERSION void load_tile(const typename E::T* src, int64_t n, float scale, float cap,
                                   float post, float* dst) {
  if (cap == 0.0f) {  // a literal 0: no tanh in the loop
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) dst[j] = transform<M>(E::load(src[j]), scale, 0.0f) * post;
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) dst[j] = transform<M>(E::load(src[j]), scale, cap) * post;
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

// Runtime divergence code and power -> the loops compiled for them (switches, not lambdas:
// a lambda would be a function of its own, outside the clone's instruction set). The switches
// over divergences take their cases from kd_math.h's list.
template <int kDiv>
FASTKD_HD void kd_sums_pow(int pow, const float* xs, const float* b, int64_t nk, float inv_t,
                           Online& A, Online& B, Online& C, double& acc) {
  switch (pow) {
    case 1: return kd_sums<kDiv, 1>(xs, b, nk, inv_t, A, B, C, acc);
    case 2: return kd_sums<kDiv, 2>(xs, b, nk, inv_t, A, B, C, acc);
    default: return kd_sums<kDiv, 0>(xs, b, nk, inv_t, A, B, C, acc);
  }
}

FASTKD_MULTIVERSION void kd_sums_any(int div, int pow, const float* xs, const float* b,
                                     int64_t nk, float inv_t, Online& A, Online& B, Online& C,
                                     double& acc) {
  switch (div) {
    case kKL: return kd_sums_pow<kKL>(pow, xs, b, nk, inv_t, A, B, C, acc);
    case kReverseKL: return kd_sums_pow<kReverseKL>(pow, xs, b, nk, inv_t, A, B, C, acc);
    default: return kd_sums_pow<-1>(pow, xs, b, nk, inv_t, A, B, C, acc);
  }
}

FASTKD_MULTIVERSION void kd_terms_any(const KDParams& p, const float* xs, const float* b,
                                      int64_t nk, float la, float lb, double& sum_d,
                                      double& sum_g) {
  switch (p.divergence) {
#define FASTKD_TERMS_CASE(id, name) \
  case id: return kd_terms<id>(p, xs, b, nk, la, lb, sum_d, sum_g);
    FASTKD_DIVERGENCES(FASTKD_TERMS_CASE)
#undef FASTKD_TERMS_CASE
  }
}

template <int kDiv>
FASTKD_HD void kd_grad_pow(int pow, const KDParams& p, const RowGrad& r, const float* xs,
                           float* b, int64_t nk) {
  switch (pow) {
    case 1: return kd_grad_tile<kDiv, 1>(p, r, xs, b, nk);
    case 2: return kd_grad_tile<kDiv, 2>(p, r, xs, b, nk);
    default: return kd_grad_tile<kDiv, 0>(p, r, xs, b, nk);
  }
}

FASTKD_MULTIVERSION void kd_grad_any(int pow, const KDParams& p, const RowGrad& r,
                                     const float* xs, float* b, int64_t nk) {
  switch (p.divergence) {
#define FASTKD_GRAD_CASE(id, name) \
  case id: return kd_grad_pow<id>(pow, p, r, xs, b, nk);
    FASTKD_DIVERGENCES(FASTKD_GRAD_CASE)
#undef FASTKD_GRAD_CASE
  }
}

// ---- Row drivers ----

// b = x_t / T on the tile's nk KD columns; -inf past the teacher's vocabulary (vocab='pad').
template <class E>
void load_teacher(const KDParams& p, const typename E::T* t, int64_t j0, int64_t nk, float* b) {
  const int64_t nt = std::clamp<int64_t>(p.vt - j0, 0, nk);
  load_tile<E>(t + j0, nt, p.t_scale, p.t_cap, p.inv_t, b);
  std::fill(b + nt, b + nk, -kInf);
}

template <class E>
void fwd_row(const KDParams& p, const typename E::T* s, const typename E::T* t, int64_t y,
             float w, float* loss, float* stats, float* xs, float* b) {
  Online A, B, C;
  double acc = 0.0;
  const int ce_pow_row = ce_pow(p);
  const int64_t cols = p.has_ce ? p.vs : (p.has_kd ? p.kv : 0);
  for (int64_t j0 = 0; j0 < cols; j0 += kTile) {
    const int64_t n = std::min(kTile, cols - j0);
    const int64_t nk = p.has_kd ? std::clamp<int64_t>(p.kv - j0, 0, n) : 0;
    load_tile<E>(s + j0, n, p.s_scale, p.s_cap, 1.0f, xs);
    const float max_kd = tile_max(xs, nk);  // -inf when nk = 0
    if (p.has_ce) C.move(std::max(max_kd, tile_max(xs + nk, n - nk)));
    int pow = 0;
    if (nk > 0) {
      load_teacher<E>(p, t, j0, nk, b);
      A.move(max_kd * p.inv_t);  // max(x) / T == max(x / T): T > 0
      B.move(tile_max(b, nk));
      // A tile of KD columns only: so were all before it, hence r_c = T r_a exactly (x / T is
      // exact and monotone for T in {1, 2}) and the kPow shortcut applies.
      pow = nk == n ? ce_pow_row : 0;
      kd_sums_any(p.divergence, pow, xs, b, nk, p.inv_t, A, B, C, acc);
    }
    if (p.has_ce && pow == 0) C.s += sum_exp(xs, n, C.ref);
  }

  float la = 0.0f, lb = 0.0f, lc = 0.0f, big_g = 0.0f;
  double total = 0.0;
  if (p.has_kd) {
    la = static_cast<float>(A.lse());
    lb = static_cast<float>(B.lse());
    double d = 0.0, g = 0.0;
    if (p.divergence == kKL) {
      d = acc / B.s - B.lse() + A.lse();
    } else if (p.divergence == kReverseKL) {
      d = g = acc / A.s - A.lse() + B.lse();
    } else {
      double sum_d = 0.0;
      for (int64_t j0 = 0; j0 < p.kv; j0 += kTile) {
        const int64_t nk = std::min(kTile, p.kv - j0);
        load_tile<E>(s + j0, nk, p.s_scale, p.s_cap, 1.0f, xs);
        load_teacher<E>(p, t, j0, nk, b);
        kd_terms_any(p, xs, b, nk, la, lb, sum_d, g);
      }
      d = with_divergence(p.divergence, [&](auto div) {
        return divergence_of<decltype(div)::value>(sum_d, g, static_cast<double>(p.mix.mix));
      });
    }
    big_g = static_cast<float>(g);
    total = static_cast<double>(p.kd_w) * p.temp * p.temp * d;
  }
  if (p.has_ce) {
    const double lse_c = C.lse();
    lc = static_cast<float>(lse_c);
    // An out-of-range label gives NaN (the contract: no host check on the device).
    const bool valid = y >= 0 && y < p.vs;
    const double ce = valid ? lse_c - transform<M>(E::load(s[y]), p.s_scale, p.s_cap)
                            : std::numeric_limits<double>::quiet_NaN();
    total += p.ce_w * ce;
  }
  *loss = static_cast<float>(w * total);
  stats[0] = la;
  stats[1] = lb;
  stats[2] = lc;
  stats[3] = big_g;
}

template <class E>
void bwd_row(const KDParams& p, const typename E::T* s, const typename E::T* t, int64_t y,
             double scale, const float* stats, typename E::T* grad, float* xs, float* g) {
  const int pow = ce_pow(p);
  RowGrad r;
  r.la = stats[0];
  r.lb = stats[1];
  r.lc = stats[2];
  r.big_g = stats[3];
  r.kd_scale = static_cast<float>(scale * p.kd_w * p.temp);
  r.ce_scale = static_cast<float>(scale * p.ce_w);
  r.ce_factor = pow ? static_cast<float>(std::exp(pow * static_cast<double>(r.la) - r.lc)) : 0.0f;
  for (int64_t j0 = 0; j0 < p.vs; j0 += kTile) {
    const int64_t n = std::min(kTile, p.vs - j0);
    const int64_t nk = p.has_kd ? std::clamp<int64_t>(p.kv - j0, 0, n) : 0;
    r.label = y >= j0 && y < j0 + n ? static_cast<int>(y - j0) : -1;
    // The whole student tile is read here, before grad (possibly the same memory) is written.
    load_tile<E>(s + j0, n, p.s_scale, p.s_cap, 1.0f, xs);
    if (nk > 0) {
      load_teacher<E>(p, t, j0, nk, g);
      kd_grad_any(pow, p, r, xs, g, nk);
    }
    std::fill(g + nk, g + n, 0.0f);
    if (p.has_ce) {
      const int64_t from = pow ? nk : 0;  // kd_grad_tile added the CE term on the KD columns
      add_ce_grad(g + from, xs + from, n - from, r.lc, r.ce_scale,
                  r.label >= from ? r.label - from : -1);
    }
    store_grad<E>(g, xs, n, p.s_scale, p.s_cap, grad + j0);
  }
}

template <class E>
void fwd_rows(const KDParams& p, float* loss, float* stats, int64_t begin, int64_t end) {
  using T = typename E::T;
  alignas(64) float xs[kTile];
  alignas(64) float b[kTile];
  for (int64_t i = begin; i < end; ++i) {
    int64_t y;
    const float w = row_weight(p, i, y);
    if (w == 0.0f) {  // the row is not read
      loss[i] = 0.0f;
      std::fill(stats + 4 * i, stats + 4 * i + 4, 0.0f);
      continue;
    }
    fwd_row<E>(p, static_cast<const T*>(p.student) + i * p.s_stride,
               static_cast<const T*>(p.teacher) + i * p.t_stride, y, w, loss + i, stats + 4 * i,
               xs, b);
  }
}

template <class E>
void bwd_rows(const KDParams& p, const KDGrad& gr, int64_t begin, int64_t end) {
  using T = typename E::T;
  alignas(64) float xs[kTile];
  alignas(64) float g[kTile];
  for (int64_t i = begin; i < end; ++i) {
    T* grad_row = static_cast<T*>(gr.grad) + i * gr.g_stride;
    int64_t y;
    const float w = row_weight(p, i, y);
    if (w == 0.0f) {
      std::memset(grad_row, 0, p.vs * sizeof(T));  // +0 is all zero bits in every dtype
      continue;
    }
    const double scale = static_cast<double>(w) * gr.grad_loss[i * gr.gl_stride];
    bwd_row<E>(p, static_cast<const T*>(p.student) + i * p.s_stride,
               static_cast<const T*>(p.teacher) + i * p.t_stride, y, scale, gr.stats + 4 * i,
               grad_row, xs, g);
  }
}

// Calls at::parallel_for over the rows with f(E{}, begin, end), E the element type of the
// logits; a task takes enough columns to outweigh its scheduling.
template <class F>
void for_rows(const KDParams& p, F&& f) {
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / p.vs);
  const auto run = [&](auto e) {
    at::parallel_for(0, p.n, grain, [&](int64_t begin, int64_t end) { f(e, begin, end); });
  };
  switch (p.dtype) {
    case Dtype::kFloat32: return run(F32{});
    case Dtype::kBFloat16: return run(BF16{});
    case Dtype::kFloat16: return run(F16{});
  }
}

}  // namespace

// The backend of the ops of csrc/kd_loss_op.h.
struct CpuBackend {
  static constexpr c10::DeviceType kDevice = c10::DeviceType::CPU;
  static constexpr int64_t kMaxColumns = std::numeric_limits<int64_t>::max();

  static void fwd(const KDParams& p, float* loss, float* stats, c10::Device) {
    for_rows(p, [&](auto e, int64_t begin, int64_t end) {
      fwd_rows<decltype(e)>(p, loss, stats, begin, end);
    });
  }

  static void bwd(const KDParams& p, const KDGrad& g, c10::Device) {
    for_rows(p, [&](auto e, int64_t begin, int64_t end) {
      bwd_rows<decltype(e)>(p, g, begin, end);
    });
  }
};

}  // namespace fastkd::cpu

// The schemas are defined in fastkd/_ops.py.
TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("kd_loss_fwd", &fastkd::kd_loss_fwd<fastkd::cpu::CpuBackend>);
  m.impl("kd_loss_bwd", &fastkd::kd_loss_bwd<fastkd::cpu::CpuBackend>);
}
