// CPU kernels of fastkd::sparse_kd_loss_fwd / _bwd / _fwd_bwd (a cached top-k teacher,
// docs/design.md §11): the backend CpuSparseBackend of the ops in csrc/sparse_kd_loss_op.h. The
// per-bin math is csrc/kd_math.h's, the one a CUDA kernel would call; the tiles, element types,
// online softmax and row loop are the dense kernels' (csrc/cpu/tiles.h). Executable truth:
// fastkd/reference.py (sparse_loss_rows).
//
// Forward, per row: one pass over the V columns in fp32 tiles for the running max and the sums
// of e^((x - m) / T) (the student's softmax at T) and of e^(x - m) (the CE's; at T = 1 or 2 a
// power of the first, no second exponential). The K columns are taken out of each tile after
// its max (kept, then set to -inf) and added to both sums in double, so the student's mass
// outside K, q_raw, is a ratio of two sums, accurate where it is tiny. The bins are made from
// the K columns, O(k), and D summed over them in double. stats[:, 0] holds T lse(x / T) over
// the columns outside K, from which and the K columns the backward rebuilds T lse(x / T) and
// q_raw (docs/design.md §11). Backward: the K columns read first (grad may be the student),
// the bins again; one pass writing, per column, the CE's gradient plus kd_weight T q_j A, and
// each K column's whole gradient (closed form, sparse_k_grad) written into the fp32 tile before
// the tile is stored, so a bf16/fp16 gradient is rounded once.
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "cpu/tiles.h"
#include "cpu/vec_math.h"
#include "kd_math.h"
#include "sparse_kd_loss_op.h"

namespace fastkd::cpu {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// ---- Tile kernels (multiversioned) ----

// Adds e^((x - ref_a) / T) to A.s and, with kPow = T (1 or 2), e^(x - ref_c) = that to the
// power T to C.s: A and C track the max of the same columns, so ref_c = ref_a.
template <int kPow, bool kWide>
FASTKD_HD void student_sums(const float* x, int64_t n, float inv_t, Online& A, Online& C) {
  const float ra = A.ref, ras = ra * inv_t;
  float sa = 0.0f, sc = 0.0f;
#pragma omp simd reduction(+ : sa, sc)
  for (int64_t j = 0; j < n; ++j) {
    const float ea = M::exp(over_t<kWide>(x[j], ra, ras, inv_t));
    sa += ea;
    if constexpr (kPow == 1) sc += ea;
    if constexpr (kPow == 2) sc += ea * ea;
  }
  A.s += sa;
  C.s += sc;
}

FASTKD_MULTIVERSION void student_sums_any(int pow, bool wide, const float* x, int64_t n,
                                          float inv_t, Online& A, Online& C) {
  if (wide) {
    switch (pow) {
      case 1: return student_sums<1, true>(x, n, inv_t, A, C);
      case 2: return student_sums<2, true>(x, n, inv_t, A, C);
      default: return student_sums<0, true>(x, n, inv_t, A, C);
    }
  }
  switch (pow) {
    case 1: return student_sums<1, false>(x, n, inv_t, A, C);
    case 2: return student_sums<2, false>(x, n, inv_t, A, C);
    default: return student_sums<0, false>(x, n, inv_t, A, C);
  }
}

// g[j] = kd_a q_j, q_j = e^((x_j - tla) / T) (kd_a: kd_scale A), plus with kPow the CE's
// ce_scale (s1_j - [j = label]), s1_j = q_j^T ce_factor (ce_factor = e^(tla - lc)).
template <int kPow, bool kWide>
FASTKD_HD void outside_grad(const float* xs, float* g, int64_t n, float tla, float inv_t,
                            float kd_a, float ce_scale, float ce_factor, int label) {
  const float las = tla * inv_t;
#pragma omp simd
  for (int j = 0; j < n; ++j) {
    const float q = M::exp(over_t<kWide>(xs[j], tla, las, inv_t));
    if constexpr (kPow == 0) {  // add_ce_grad adds the CE term
      g[j] = kd_a * q;
    } else {
      const float s1 = (kPow == 1 ? q : q * q) * ce_factor;
      g[j] = logit_grad(kd_a, q, ce_scale, ce_grad(s1, j == label));
    }
  }
}

FASTKD_MULTIVERSION void outside_grad_any(int pow, bool wide, const float* xs, float* g,
                                          int64_t n, float tla, float inv_t, float kd_a,
                                          float ce_scale, float ce_factor, int label) {
  if (wide) return outside_grad<0, true>(xs, g, n, tla, inv_t, kd_a, ce_scale, ce_factor, label);
  switch (pow) {
    case 1: return outside_grad<1, false>(xs, g, n, tla, inv_t, kd_a, ce_scale, ce_factor, label);
    case 2: return outside_grad<2, false>(xs, g, n, tla, inv_t, kd_a, ce_scale, ce_factor, label);
    default:
      return outside_grad<0, false>(xs, g, n, tla, inv_t, kd_a, ce_scale, ce_factor, label);
  }
}

// ---- Row drivers ----

// T when it is 1 or 2 and both terms are on (the e^c shortcut), else 0.
int ce_pow(const SparseParams& p) {
  return p.has_kd && p.has_ce && (p.temp == 1.0f || p.temp == 2.0f) ? static_cast<int>(p.temp)
                                                                      : 0;
}

// Per-task buffers: one entry per bin (k), one per tile.
struct Scratch {
  std::vector<float> x;              // the K columns' x (transformed logits)
  std::vector<float> lq, lq_bin, g;  // per bin: full-vocabulary lq, the bin's lQ, dD/dlQ
  std::vector<int64_t> order;        // the bins grouped by the tile of their column
  std::vector<int64_t> tile_end;     // tile t's bins: order[tile_end[t - 1] .. tile_end[t])
  explicit Scratch(const SparseParams& p)
      : x(p.k), lq(p.k), lq_bin(p.k), g(p.k), order(p.k), tile_end((p.v + kTile - 1) / kTile) {}
};

// Groups the bins by the tile of their column (a counting sort, O(k + tiles)). False at an id
// outside [0, V): that row is not read at all.
bool group(const SparseParams& p, const int64_t* ids, Scratch& w) {
  for (int64_t i = 0; i < p.k; ++i) {
    if (ids[i] < 0 || ids[i] >= p.v) return false;
  }
  std::fill(w.tile_end.begin(), w.tile_end.end(), 0);
  for (int64_t i = 0; i < p.k; ++i) ++w.tile_end[ids[i] / kTile];
  int64_t start = 0;
  for (int64_t& t : w.tile_end) start += std::exchange(t, start);  // each tile's start
  for (int64_t i = 0; i < p.k; ++i) w.order[w.tile_end[ids[i] / kTile]++] = i;  // now its end
  return true;
}

// The student's softmax at T over all V columns, in double: T lse(x / T) and q_raw, the mass
// outside K, from s_out = the sum of e^((x_j - m) / T) outside K and the gathered K columns (m:
// at least every x_K). q_raw is a ratio of two sums, accurate where it is tiny; 1 - sum_K q
// would carry every rounding of T lse(x / T) as an absolute error (docs/design.md §11).
struct Softmax {
  double tla, q_raw;
};

Softmax full_softmax(const SparseParams& p, float m, double s_out, const Scratch& w) {
  double s_k = 0.0;
  for (int64_t i = 0; i < p.k; ++i) s_k += M::exp(static_cast<float>((w.x[i] - m) * p.inv_t));
  const double s = s_out + s_k;
  return {m + std::log(s) / p.inv_t, s_out / s};
}

// log sum_i e^l_i from the max, in double: exact where the terms underflow fp32 (the student's
// mass on K can be tiny); -inf for all l_i -inf.
double log_sum_exp(const float* l, int64_t k) {
  const float m = *std::max_element(l, l + k);
  if (m == -kInf) return -kInf;
  double s = 0.0;
  for (int64_t i = 0; i < k; ++i) s += M::exp(l[i] - m);
  return m + std::log(s);
}

// A row's bins (docs/design.md §11): D and what the gradient needs beyond the per-bin values
// left in Scratch.
struct RowBins {
  double d;      // D
  double g_k;    // sum over K of dD/dlQ
  float g_tail;  // dD/dlQ_tail, 0 without a tail bin
  float q_tail;  // the student's tail mass, floored; 1 without a tail bin
};

template <int kDiv>
RowBins row_bins(const SparseParams& p, const float* lp, const Softmax& sm, Scratch& w) {
  const int64_t k = p.k;
  for (int64_t i = 0; i < k; ++i) w.lq[i] = static_cast<float>((w.x[i] - sm.tla) * p.inv_t);
  const double log_sp = log_sum_exp(lp, k);
  const double log_sq = p.tail == kRenormalize ? log_sum_exp(w.lq.data(), k) : 0.0;
  RowBins r{0.0, 0.0, 0.0f, 1.0f};
  for (int64_t i = 0; i < k; ++i) {
    const BinLogs b = k_bin_logs(p.tail, lp[i], w.lq[i], static_cast<float>(log_sp),
                                 static_cast<float>(log_sq));
    const Bin t = bin_terms<M, kDiv>(b.lp, b.lq, p.mix);
    r.d += t.d;
    r.g_k += t.g;
    w.lq_bin[i] = b.lq;
    w.g[i] = t.g;
  }
  if (p.tail == kBucket && k < p.v) {
    const TailBin tp = tail_bin<M>(static_cast<float>(std::exp(log_sp)));
    r.q_tail = static_cast<float>(std::max<double>(sm.q_raw, kTailFloor));
    const Bin t = bin_terms<M, kDiv>(tp.log, static_cast<float>(std::log(r.q_tail)), p.mix);
    r.d += t.d;
    r.g_tail = t.g;
  }
  return r;
}

RowBins row_bins_any(const SparseParams& p, const float* lp, const Softmax& sm, Scratch& w) {
  return with_divergence(p.divergence,
                         [&](auto div) { return row_bins<decltype(div)::value>(p, lp, sm, w); });
}

template <class E>
void fwd_row(const SparseParams& p, const typename E::T* s, const int64_t* ids, const float* lp,
             int64_t y, float w, float* loss, float* stats, float* xs, Scratch& scratch) {
  const bool kd = p.has_kd && group(p, ids, scratch);  // false at a bad id
  Online A{p.inv_t}, C;
  const int pow = ce_pow(p);
  const int64_t cols = p.has_kd || p.has_ce ? p.v : 0;
  int64_t next = 0;  // in scratch.order
  for (int64_t j0 = 0, t = 0; j0 < cols; j0 += kTile, ++t) {
    const int64_t n = std::min(kTile, cols - j0);
    load_tile<E>(s + j0, n, p.s_scale, p.s_cap, xs);
    const float m = tile_max(xs, n);
    if (p.has_kd) A.move(m);
    if (p.has_ce) C.move(m);
    // The K columns are kept, and left out of the tile's sums: they are added below.
    for (; kd && next < scratch.tile_end[t]; ++next) {
      const int64_t i = scratch.order[next];
      scratch.x[i] = std::exchange(xs[ids[i] - j0], -kInf);
    }
    if (p.has_kd) student_sums_any(pow, is_wide(A.ref, A.ref, p.inv_t), xs, n, p.inv_t, A, C);
    if (p.has_ce && pow == 0) C.s += sum_exp(xs, n, C.ref);
  }

  // stats[0]: T lse(x / T) over the columns outside K, from which the backward rebuilds the full
  // one and q_raw with the K columns (docs/design.md §11). NaN (and D) at a bad id.
  double l_out = p.has_kd ? kNaN : 0.0, d = l_out, total = 0.0;
  float lc = 0.0f;
  if (kd) {
    l_out = A.m + std::log(A.s) / A.inv_t;
    d = row_bins_any(p, lp, full_softmax(p, A.m, A.s, scratch), scratch).d;
    if (p.has_ce) {
      for (int64_t i = 0; i < p.k; ++i) C.s += M::exp(scratch.x[i] - C.m);
    }
  }
  if (p.has_kd) total = static_cast<double>(p.kd_w) * p.temp * p.temp * d;
  if (p.has_ce) {
    lc = C.stat();
    // An out-of-range label gives NaN, as in the dense kernels.
    const bool valid = y >= 0 && y < p.v;
    const double ce =
        valid ? static_cast<double>(C.m) - transform<M>(E::load(s[y]), p.s_scale, p.s_cap) +
                    std::log(C.s)
              : std::numeric_limits<double>::quiet_NaN();
    total += p.ce_w * ce;
  }
  *loss = static_cast<float>(w * total);
  stats[0] = static_cast<float>(l_out);
  stats[1] = lc;
  stats[2] = static_cast<float>(d);
}

template <class E>
void bwd_row(const SparseParams& p, const typename E::T* s, const int64_t* ids, const float* lp,
             int64_t y, double scale, const float* stats, typename E::T* grad, float* xs,
             float* g, Scratch& scratch) {
  const float lc = stats[1];
  const double kd_scale = scale * p.kd_w * p.temp;
  const float ce_scale = static_cast<float>(scale * p.ce_w);
  float kd_a = 0.0f;  // kd_scale A: a column j outside K gets kd_a q_j
  float tla = 0.0f;   // T lse(x / T)
  bool k_cols = false;  // whether scratch.g holds the K columns' gradients
  if (p.has_kd && kd_grad_on(stats[2])) {
    if (group(p, ids, scratch)) {
      // The K columns are read before grad (possibly the student itself) is written.
      for (int64_t i = 0; i < p.k; ++i) {
        scratch.x[i] = transform<M>(E::load(s[ids[i]]), p.s_scale, p.s_cap);
      }
      const float l_out = stats[0];
      const float m = std::max(l_out, *std::max_element(scratch.x.begin(), scratch.x.end()));
      const Softmax sm = full_softmax(p, m, std::exp((static_cast<double>(l_out) - m) * p.inv_t),
                                      scratch);
      const RowBins r = row_bins_any(p, lp, sm, scratch);
      const auto f = sparse_factors<double>(p.tail, r.g_tail, sm.q_raw, r.q_tail, r.g_k);
      kd_a = static_cast<float>(kd_scale * f.a);
      tla = static_cast<float>(sm.tla);
      for (int64_t i = 0; i < p.k; ++i) {  // g: dD/dlQ of the bin -> the column's gradient
        const float dd = sparse_k_grad<M>(p.tail, scratch.g[i], scratch.lq[i],
                                          scratch.lq_bin[i], static_cast<float>(f.c));
        const float ce = p.has_ce ? ce_grad(M::exp(scratch.x[i] - lc), ids[i] == y) : 0.0f;
        scratch.g[i] = logit_grad(static_cast<float>(kd_scale), dd, ce_scale, ce);
      }
      k_cols = true;
    } else {
      kd_a = kNaN;  // an id outside [0, V): the row's whole KD gradient is NaN
    }
  }
  // kd_a is 0 in renormalize mode and without a KD gradient: no exponential of q then.
  const bool outside = kd_a != 0.0f;
  const bool wide = is_wide(tla, tla, p.inv_t);
  const int pow = outside && !wide ? ce_pow(p) : 0;
  const float ce_factor =
      pow ? static_cast<float>(std::exp(static_cast<double>(tla) - lc)) : 0.0f;
  int64_t next = 0;  // in scratch.order
  for (int64_t j0 = 0, t = 0; j0 < p.v; j0 += kTile, ++t) {
    const int64_t n = std::min(kTile, p.v - j0);
    const int label = y >= j0 && y < j0 + n ? static_cast<int>(y - j0) : -1;
    // The whole student tile is read here, before grad (possibly the same memory) is written.
    load_tile<E>(s + j0, n, p.s_scale, p.s_cap, xs);
    if (outside) {
      outside_grad_any(pow, wide, xs, g, n, tla, p.inv_t, kd_a, ce_scale, ce_factor, label);
    } else {
      std::fill(g, g + n, 0.0f);
    }
    if (p.has_ce && pow == 0) add_ce_grad(g, xs, n, lc, ce_scale, label);
    if (k_cols) {  // the K columns' own value, in fp32 before the store's one rounding
      for (; next < scratch.tile_end[t]; ++next) {
        const int64_t i = scratch.order[next];
        g[ids[i] - j0] = scratch.g[i];
      }
    }
    store_grad<E>(g, xs, n, p.s_scale, p.s_cap, grad + j0);
  }
}

template <class E>
void fwd_rows(const SparseParams& p, float* loss, float* stats, int64_t begin, int64_t end,
              Scratch& scratch) {
  using T = typename E::T;
  alignas(64) float xs[kTile];
  for (int64_t i = begin; i < end; ++i) {
    float* st = stats + kSparseStats * i;
    int64_t y;
    const float w = row_weight(p, i, y);
    if (w == 0.0f) {  // the row is not read
      loss[i] = 0.0f;
      std::fill(st, st + kSparseStats, 0.0f);
      continue;
    }
    fwd_row<E>(p, static_cast<const T*>(p.student) + i * p.s_stride, p.ids + i * p.id_stride,
               p.logprobs + i * p.lp_stride, y, w, loss + i, st, xs, scratch);
  }
}

template <class E>
void bwd_rows(const SparseParams& p, const KDGrad& gr, int64_t begin, int64_t end,
              Scratch& scratch) {
  using T = typename E::T;
  alignas(64) float xs[kTile];
  alignas(64) float g[kTile];
  for (int64_t i = begin; i < end; ++i) {
    T* grad_row = static_cast<T*>(gr.grad) + i * gr.g_stride;
    int64_t y;
    const float w = row_weight(p, i, y);
    if (w == 0.0f) {
      std::memset(grad_row, 0, p.v * sizeof(T));  // +0 is all zero bits in every dtype
      continue;
    }
    const double scale = static_cast<double>(w) * gr.grad_loss[i * gr.gl_stride];
    bwd_row<E>(p, static_cast<const T*>(p.student) + i * p.s_stride, p.ids + i * p.id_stride,
               p.logprobs + i * p.lp_stride, y, scale, gr.stats + kSparseStats * i, grad_row, xs,
               g, scratch);
  }
}

// Each row's forward, then its backward while the row is in L2.
template <class E>
void fwd_bwd_rows(const SparseParams& p, const KDGrad& gr, float* loss, float* stats,
                  int64_t begin, int64_t end, Scratch& scratch) {
  for (int64_t i = begin; i < end; ++i) {
    fwd_rows<E>(p, loss, stats, i, i + 1, scratch);
    bwd_rows<E>(p, gr, i, i + 1, scratch);
  }
}

}  // namespace

// The backend of the ops of csrc/sparse_kd_loss_op.h.
struct CpuSparseBackend {
  static constexpr c10::DeviceType kDevice = c10::DeviceType::CPU;
  static constexpr int64_t kMaxColumns = std::numeric_limits<int64_t>::max();

  static void fwd(const SparseParams& p, float* loss, float* stats, c10::Device) {
    for_rows(p.n, p.v, p.dtype, [&](auto e, int64_t begin, int64_t end) {
      Scratch scratch(p);
      fwd_rows<decltype(e)>(p, loss, stats, begin, end, scratch);
    });
  }

  static void bwd(const SparseParams& p, const KDGrad& g, c10::Device) {
    for_rows(p.n, p.v, p.dtype, [&](auto e, int64_t begin, int64_t end) {
      Scratch scratch(p);
      bwd_rows<decltype(e)>(p, g, begin, end, scratch);
    });
  }

  // g.stats is `stats`: the backward of a row reads what its forward wrote.
  static void fwd_bwd(const SparseParams& p, const KDGrad& g, float* loss, float* stats,
                      c10::Device) {
    for_rows(p.n, p.v, p.dtype, [&](auto e, int64_t begin, int64_t end) {
      Scratch scratch(p);
      fwd_bwd_rows<decltype(e)>(p, g, loss, stats, begin, end, scratch);
    });
  }
};

}  // namespace fastkd::cpu

// The schemas are defined in fastkd/_ops.py.
TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("sparse_kd_loss_fwd", &fastkd::sparse_kd_loss_fwd<fastkd::cpu::CpuSparseBackend>);
  m.impl("sparse_kd_loss_bwd", &fastkd::sparse_kd_loss_bwd<fastkd::cpu::CpuSparseBackend>);
  m.impl("sparse_kd_loss_fwd_bwd",
         &fastkd::sparse_kd_loss_fwd_bwd<fastkd::cpu::CpuSparseBackend>);
}
