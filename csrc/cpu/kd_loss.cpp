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
// functions) are compiled for AVX-512, AVX2+FMA and the baseline, and picked at load time;
// the row drivers (scalar bookkeeping, one call per tile) are plain code.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "cpu/tiles.h"
#include "cpu/vec_math.h"
#include "kd_loss_op.h"
#include "kd_math.h"

namespace fastkd::cpu {
namespace {

// T when it is 1 or 2 and both terms are on (the kPow shortcut, see kd_sums), else 0.
int ce_pow(const KDParams& p) {
  return p.has_kd && p.has_ce && (p.temp == 1.0f || p.temp == 2.0f) ? static_cast<int>(p.temp)
                                                                      : 0;
}

// Whether a tile of pass 1 needs kd_sums' kSlow: a partner min (kl: student, reverse_kl:
// teacher; 0 for the other divergences) that is -inf or huge, or running maxima outside the fast
// one_pass_term's range or over_t's fast one.
bool slow_tile(float partner_min, float ra, float rb, float inv_t) {
  return !(partner_min >= -kHugeLogit) ||
         !(std::max(std::fabs(ra), std::fabs(rb)) <= kHugeLogit / 2) || is_wide(ra, rb, inv_t);
}

// Per-row values of the backward.
struct RowGrad {
  float tla, tlb, lc, big_g;  // stats: T lse(a), T lse(b), lse(c), G
  float kd_scale, ce_scale;   // w grad_loss kd_weight T, w grad_loss ce_weight
  float ce_factor;            // e^(T lse(a) - lse(c)) for the kPow shortcut
  bool wide;                  // over_t's kWide
  int label;  // the label's column in the current tile, -1 if not in it (int: vectorises on SSE2)
};

// ---- Loop bodies, one instance per divergence (inlined into the tile kernels) ----
//
// All running maxima and the stats' log-sum-exps are in logit units (Online): the student's
// x_s (CE: c = x_s) and the teacher's x_t; the loops form (x - ref) / T, never x / T.
//
// With T = 1 or 2 (the default) the CE's e^c needs no exponential of its own on the KD columns:
// e^(c - r) = (e^((x - r) / T))^T with the one running max r of both, and
// s1 = e^(c - lse_c) = q^T e^(T lse_a - lse_c). kPow is that T, or 0 (separate exponentials).

// Pass 1 on the KD columns of a tile (xs: x_s, xt: x_t): the sums of e^((x_s - ref_a) / T),
// e^((x_t - ref_b) / T) (and of e^(c - ref_c) when kPow), and for kl (reverse_kl) the sum of
// e^((x_t - ref_b) / T) (x_t - x_s) (of e^((x_s - ref_a) / T) (x_s - x_t)) into acc, and the
// max of the lead where the partner is -inf into mi. kSlow (slow_tile: the rare case): the
// tile has such a partner, huge logits, or needs over_t's kWide; the fast loop handles none.
template <int kDiv, int kPow, bool kSlow>
FASTKD_HD void kd_sums(const float* xs, const float* xt, int64_t nk, float inv_t, Online& A,
                       Online& B, Online& C, double& acc, float& mi) {
  const float ra = A.ref, rb = B.ref, ras = ra * inv_t, rbs = rb * inv_t;
  float sa = 0.0f, sb = 0.0f, sc = 0.0f, k = 0.0f, mk = -kInf;
#pragma omp simd reduction(+ : sa, sb, sc, k) reduction(max : mk)
  for (int64_t j = 0; j < nk; ++j) {
    const float ea = M::exp(over_t<kSlow>(xs[j], ra, ras, inv_t));
    const float eb = M::exp(over_t<kSlow>(xt[j], rb, rbs, inv_t));
    sa += ea;
    sb += eb;
    if constexpr (kPow == 1) sc += ea;
    if constexpr (kPow == 2) sc += ea * ea;
    if constexpr (kDiv == kKL) {
      k += one_pass_term<kSlow>(xt[j], xs[j], eb);
      if constexpr (kSlow) mk = std::max(mk, masked_lead(xt[j], xs[j]));
    }
    if constexpr (kDiv == kReverseKL) {
      k += one_pass_term<kSlow>(xs[j], xt[j], ea);
      if constexpr (kSlow) mk = std::max(mk, masked_lead(xs[j], xt[j]));
    }
  }
  A.s += sa;
  B.s += sb;
  C.s += sc;
  mi = std::max(mi, mk);
  if constexpr (kDiv == kKL) acc = acc * B.rescale + k;
  if constexpr (kDiv == kReverseKL) acc = acc * A.rescale + k;
}

// Pass 2 of the forward (jsd, tvd, skew divergences) on the KD columns of a tile, once the
// log-sum-exps are known (tla = T lse(a), tlb = T lse(b)): adds the tile's sums of
// two_pass_terms to sum_d, sum_g.
template <int kDiv, bool kWide>
FASTKD_HD void kd_terms(const KDParams& p, const float* xs, const float* xt, int64_t nk,
                        float tla, float tlb, double& sum_d, double& sum_g) {
  const float inv_t = p.inv_t, las = tla * inv_t, lbs = tlb * inv_t;
  const Mixture w = p.mix;
  float sd = 0.0f, sg = 0.0f;
#pragma omp simd reduction(+ : sd, sg)
  for (int64_t j = 0; j < nk; ++j) {
    const float lq = over_t<kWide>(xs[j], tla, las, inv_t);
    const float lp = over_t<kWide>(xt[j], tlb, lbs, inv_t);
    const Terms t = two_pass_terms<M, kDiv>(lq, lp, M::exp(lq), M::exp(lp), w);
    sd += t.d;
    sg += t.g;
  }
  sum_d += sd;
  sum_g += sg;
}

// The backward on the KD columns of a tile, written over the teacher's x_t in b:
// b[j] = kd_scale dD/da_j, plus ce_scale dCE/dc_j with s1_j = q_j^T e^(T lse(a) - lc) when kPow
// (see above).
template <int kDiv, int kPow, bool kWide>
FASTKD_HD void kd_grad_tile(const KDParams& p, const RowGrad& r, const float* xs, float* b,
                            int64_t nk) {
  const float inv_t = p.inv_t, tla = r.tla, tlb = r.tlb, big_g = r.big_g;
  const float las = tla * inv_t, lbs = tlb * inv_t;
  const float kd_scale = r.kd_scale, ce_scale = r.ce_scale, ce_factor = r.ce_factor;
  const int label = r.label;
  const Mixture w = p.mix;
#pragma omp simd
  for (int j = 0; j < nk; ++j) {
    const float lq = over_t<kWide>(xs[j], tla, las, inv_t);
    const float lp = over_t<kWide>(b[j], tlb, lbs, inv_t);
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

// The max, and the min into lo (in the same loop it costs next to nothing).
FASTKD_MULTIVERSION float tile_max_min(const float* x, int64_t n, float& lo) {
  float m = -kInf, mn = kInf;
#pragma omp simd reduction(max : m) reduction(min : mn)
  for (int64_t j = 0; j < n; ++j) {
    m = x[j] > m ? x[j] : m;
    mn = x[j] < mn ? x[j] : mn;
  }
  lo = mn;
  return m;
}

// Runtime divergence code and power -> the loops compiled for them (switches, not lambdas:
// a lambda would be a function of its own, outside the clone's instruction set). The switches
// over divergences take their cases from kd_math.h's list.
template <int kDiv, bool kMasked>
FASTKD_HD void kd_sums_pow(int pow, const float* xs, const float* xt, int64_t nk, float inv_t,
                           Online& A, Online& B, Online& C, double& acc, float& mi) {
  switch (pow) {
    case 1: return kd_sums<kDiv, 1, kMasked>(xs, xt, nk, inv_t, A, B, C, acc, mi);
    case 2: return kd_sums<kDiv, 2, kMasked>(xs, xt, nk, inv_t, A, B, C, acc, mi);
    default: return kd_sums<kDiv, 0, kMasked>(xs, xt, nk, inv_t, A, B, C, acc, mi);
  }
}

// slow: kd_sums' kSlow.
FASTKD_MULTIVERSION void kd_sums_any(int div, int pow, bool slow, const float* xs,
                                     const float* xt, int64_t nk, float inv_t, Online& A,
                                     Online& B, Online& C, double& acc, float& mi) {
  switch (div) {
    case kKL:
      if (slow) return kd_sums_pow<kKL, true>(pow, xs, xt, nk, inv_t, A, B, C, acc, mi);
      return kd_sums_pow<kKL, false>(pow, xs, xt, nk, inv_t, A, B, C, acc, mi);
    case kReverseKL:
      if (slow) return kd_sums_pow<kReverseKL, true>(pow, xs, xt, nk, inv_t, A, B, C, acc, mi);
      return kd_sums_pow<kReverseKL, false>(pow, xs, xt, nk, inv_t, A, B, C, acc, mi);
    default:
      if (slow) return kd_sums_pow<-1, true>(pow, xs, xt, nk, inv_t, A, B, C, acc, mi);
      return kd_sums_pow<-1, false>(pow, xs, xt, nk, inv_t, A, B, C, acc, mi);
  }
}

FASTKD_MULTIVERSION void kd_terms_any(bool wide, const KDParams& p, const float* xs,
                                      const float* xt, int64_t nk, float tla, float tlb,
                                      double& sum_d, double& sum_g) {
  switch (p.divergence) {
#define FASTKD_TERMS_CASE(id, name)                                              \
  case id:                                                                       \
    if (wide) return kd_terms<id, true>(p, xs, xt, nk, tla, tlb, sum_d, sum_g); \
    return kd_terms<id, false>(p, xs, xt, nk, tla, tlb, sum_d, sum_g);
    FASTKD_DIVERGENCES(FASTKD_TERMS_CASE)
#undef FASTKD_TERMS_CASE
  }
}

template <int kDiv>
FASTKD_HD void kd_grad_pow(int pow, const KDParams& p, const RowGrad& r, const float* xs,
                           float* b, int64_t nk) {
  if (r.wide) return kd_grad_tile<kDiv, 0, true>(p, r, xs, b, nk);  // T < 1: no kPow
  switch (pow) {
    case 1: return kd_grad_tile<kDiv, 1, false>(p, r, xs, b, nk);
    case 2: return kd_grad_tile<kDiv, 2, false>(p, r, xs, b, nk);
    default: return kd_grad_tile<kDiv, 0, false>(p, r, xs, b, nk);
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

// x_t on the tile's nk KD columns, -inf past the teacher's vocabulary (vocab='pad').
template <class E>
void load_teacher(const KDParams& p, const typename E::T* t, int64_t j0, int64_t nk, float* b) {
  const int64_t nt = std::clamp<int64_t>(p.vt - j0, 0, nk);
  load_tile<E>(t + j0, nt, p.t_scale, p.t_cap, b);
  std::fill(b + nt, b + nk, -kInf);
}

template <class E>
void fwd_row(const KDParams& p, const typename E::T* s, const typename E::T* t, int64_t y,
             float w, float* loss, float* stats, float* xs, float* b) {
  Online A{p.inv_t}, B{p.inv_t}, C;
  double acc = 0.0;
  float mi = -kInf;  // the max of the lead where the partner is -inf (kl, reverse_kl)
  const int ce_pow_row = ce_pow(p);
  const int64_t cols = p.has_ce ? p.vs : (p.has_kd ? p.kv : 0);
  for (int64_t j0 = 0; j0 < cols; j0 += kTile) {
    const int64_t n = std::min(kTile, cols - j0);
    const int64_t nk = p.has_kd ? std::clamp<int64_t>(p.kv - j0, 0, n) : 0;
    load_tile<E>(s + j0, n, p.s_scale, p.s_cap, xs);
    float partner_min = 0.0f;  // of the student (kl) or the teacher (reverse_kl)
    const float max_kd = p.divergence == kKL ? tile_max_min(xs, nk, partner_min)
                                             : tile_max(xs, nk);  // -inf when nk = 0
    if (p.has_ce) C.move(std::max(max_kd, tile_max(xs + nk, n - nk)));
    int pow = 0;
    if (nk > 0) {
      load_teacher<E>(p, t, j0, nk, b);
      A.move(max_kd);
      B.move(p.divergence == kReverseKL ? tile_max_min(b, nk, partner_min) : tile_max(b, nk));
      // A tile of KD columns only: so were all before it, hence r_c = r_a and the kPow
      // shortcut applies.
      pow = nk == n ? ce_pow_row : 0;
      const bool slow = slow_tile(partner_min, A.ref, B.ref, p.inv_t);
      kd_sums_any(p.divergence, pow, slow, xs, b, nk, p.inv_t, A, B, C, acc, mi);
    }
    if (p.has_ce && pow == 0) C.s += sum_exp(xs, n, C.ref);
  }

  float tla = 0.0f, tlb = 0.0f, lc = 0.0f, big_g = 0.0f;
  double total = 0.0;
  if (p.has_kd) {
    tla = A.stat();
    tlb = B.stat();
    // lse(a) - lse(b) as (m_a - m_b) / T + log(s_a / s_b): no cancellation of large log-sum-exps.
    const double la_lb = (static_cast<double>(A.m) - B.m) * A.inv_t + std::log(A.s / B.s);
    double d = 0.0, g = 0.0;
    if (p.divergence == kKL) {
      d = partner_masked_live<double>(mi, B.m, std::log(B.s), B.inv_t)
              ? kInf
              : acc * B.inv_t / B.s + la_lb;
      g = d;  // G = D: the backward tests it for +inf (kd_grad_on)
    } else if (p.divergence == kReverseKL) {
      d = g = partner_masked_live<double>(mi, A.m, std::log(A.s), A.inv_t)
                  ? kInf
                  : acc * A.inv_t / A.s - la_lb;
    } else {
      double sum_d = 0.0;
      const bool wide = is_wide(tla, tlb, p.inv_t);
      for (int64_t j0 = 0; j0 < p.kv; j0 += kTile) {
        const int64_t nk = std::min(kTile, p.kv - j0);
        load_tile<E>(s + j0, nk, p.s_scale, p.s_cap, xs);
        load_teacher<E>(p, t, j0, nk, b);
        kd_terms_any(wide, p, xs, b, nk, tla, tlb, sum_d, g);
      }
      d = with_divergence(p.divergence, [&](auto div) {
        return divergence_of<decltype(div)::value>(sum_d, g, static_cast<double>(p.mix.mix));
      });
    }
    big_g = static_cast<float>(g);
    total = static_cast<double>(p.kd_w) * p.temp * p.temp * d;
  }
  if (p.has_ce) {
    lc = C.stat();
    // An out-of-range label gives NaN (the contract: no host check on the device). The CE is
    // (m_c - c_y) + log s_c, exact where c_y is near the max, whatever the logits' magnitude.
    const bool valid = y >= 0 && y < p.vs;
    const double ce =
        valid ? static_cast<double>(C.m) - transform<M>(E::load(s[y]), p.s_scale, p.s_cap) +
                    std::log(C.s)
              : std::numeric_limits<double>::quiet_NaN();
    total += p.ce_w * ce;
  }
  *loss = static_cast<float>(w * total);
  stats[0] = tla;
  stats[1] = tlb;
  stats[2] = lc;
  stats[3] = big_g;
}

template <class E>
void bwd_row(const KDParams& p, const typename E::T* s, const typename E::T* t, int64_t y,
             double scale, const float* stats, typename E::T* grad, float* xs, float* g) {
  RowGrad r;
  r.tla = stats[0];
  r.tlb = stats[1];
  r.lc = stats[2];
  r.big_g = stats[3];
  r.wide = is_wide(r.tla, r.tlb, p.inv_t);
  const int pow = r.wide ? 0 : ce_pow(p);  // kd_grad_tile has no kPow for wide rows
  const bool kd_on = p.has_kd && kd_grad_on(r.big_g);
  r.kd_scale = static_cast<float>(scale * p.kd_w * p.temp);
  r.ce_scale = static_cast<float>(scale * p.ce_w);
  r.ce_factor = pow ? static_cast<float>(std::exp(static_cast<double>(r.tla) - r.lc)) : 0.0f;
  for (int64_t j0 = 0; j0 < p.vs; j0 += kTile) {
    const int64_t n = std::min(kTile, p.vs - j0);
    const int64_t nk = kd_on ? std::clamp<int64_t>(p.kv - j0, 0, n) : 0;
    r.label = y >= j0 && y < j0 + n ? static_cast<int>(y - j0) : -1;
    // The whole student tile is read here, before grad (possibly the same memory) is written.
    load_tile<E>(s + j0, n, p.s_scale, p.s_cap, xs);
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

// The forward and, with the gradient scale known (grad_loss), the backward of each row in one
// call: the backward's passes find the row in L2 (a row of both models at V = 32000 takes
// 256 KiB in fp32), not in memory as two separate calls over [N, V] would.
template <class E>
void fwd_bwd_rows(const KDParams& p, const KDGrad& gr, float* loss, float* stats, int64_t begin,
                  int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    fwd_rows<E>(p, loss, stats, i, i + 1);
    bwd_rows<E>(p, gr, i, i + 1);
  }
}

}  // namespace

// The backend of the ops of csrc/kd_loss_op.h.
struct CpuBackend {
  static constexpr c10::DeviceType kDevice = c10::DeviceType::CPU;
  static constexpr int64_t kMaxColumns = std::numeric_limits<int64_t>::max();

  static void fwd(const KDParams& p, float* loss, float* stats, c10::Device) {
    for_rows(p.n, p.vs, p.dtype, [&](auto e, int64_t begin, int64_t end) {
      fwd_rows<decltype(e)>(p, loss, stats, begin, end);
    });
  }

  static void bwd(const KDParams& p, const KDGrad& g, c10::Device) {
    for_rows(p.n, p.vs, p.dtype, [&](auto e, int64_t begin, int64_t end) {
      bwd_rows<decltype(e)>(p, g, begin, end);
    });
  }

  // g.stats is `stats`: the backward of a row reads what its forward wrote.
  static void fwd_bwd(const KDParams& p, const KDGrad& g, float* loss, float* stats,
                      c10::Device) {
    for_rows(p.n, p.vs, p.dtype, [&](auto e, int64_t begin, int64_t end) {
      fwd_bwd_rows<decltype(e)>(p, g, loss, stats, begin, end);
    });
  }
};

}  // namespace fastkd::cpu

// The schemas are defined in fastkd/_ops.py.
TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("kd_loss_fwd", &fastkd::kd_loss_fwd<fastkd::cpu::CpuBackend>);
  m.impl("kd_loss_bwd", &fastkd::kd_loss_bwd<fastkd::cpu::CpuBackend>);
  m.impl("kd_loss_fwd_bwd", &fastkd::kd_loss_fwd_bwd<fastkd::cpu::CpuBackend>);
}
