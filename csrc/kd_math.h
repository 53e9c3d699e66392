// The element math of the native kernels, one copy for CPU and CUDA (docs/design.md §3): the
// divergence codes and, per column, the logit transform, the log-mixture, each divergence's loss,
// G and dD/da_j terms and the CE's gradient; the sparse loss's tail codes and per-bin terms
// (docs/design.md §11). Plain C++ for nvcc and g++; math policy M (static
// fp32 exp, log1p, tanh): CudaMath (accurate expf...) in csrc/cuda/kd_loss.cu, CpuMath
// (vectorisable polynomials) in csrc/cpu/vec_math.h. Row algorithms stay in the backends.
#pragma once

#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__)
#define FASTKD_HD __host__ __device__ __forceinline__
#else
// always_inline: inside a multiversioned CPU kernel, the callee is compiled for its ISA.
#define FASTKD_HD inline __attribute__((always_inline))
#endif

namespace fastkd {

// The divergences in fastkd._options.DIVERGENCES order: X(enumerator, Python name). The code is
// the position (the ops' `divergence` argument); fastkd._C.divergence_codes() exports the names.
#define FASTKD_DIVERGENCES(X)       \
  X(kKL, "kl")                      \
  X(kReverseKL, "reverse_kl")       \
  X(kJSD, "jsd")                    \
  X(kTVD, "tvd")                    \
  X(kSkewKL, "skew_kl")             \
  X(kSkewReverseKL, "skew_reverse_kl")

enum Divergence : int {
#define FASTKD_DIVERGENCE_ENUM(id, name) id,
  FASTKD_DIVERGENCES(FASTKD_DIVERGENCE_ENUM)
#undef FASTKD_DIVERGENCE_ENUM
  kNumDivergences
};

// The divergences through a mixture m of p and q, weighted by `mix` (beta or skew).
constexpr bool is_mixture(int64_t divergence) {
  return divergence == kJSD || divergence == kSkewKL || divergence == kSkewReverseKL;
}

// Calls f(std::integral_constant<int, code>{}) for a divergence code, so a kernel is compiled per
// divergence with no branch on it inside. Host code; resolve_params has checked the code.
template <class F>
decltype(auto) with_divergence(int divergence, F&& f) {
  switch (divergence) {
#define FASTKD_DIVERGENCE_CASE(id, name) \
  case id: return f(std::integral_constant<int, id>{});
    FASTKD_DIVERGENCES(FASTKD_DIVERGENCE_CASE)
#undef FASTKD_DIVERGENCE_CASE
  }
  return f(std::integral_constant<int, kKL>{});  // not reached
}

constexpr float kInf = __builtin_huge_valf();
constexpr float kMaxFloat = 3.40282347e+38f;  // the largest finite fp32

// ln 2^-1075, where e^x rounds to 0 in fp64: a log-probability at or below it is a probability of
// exactly 0, whatever fp32 rounds e^x to in between (docs/design.md §3).
constexpr float kLogMin = -745.133219f;

// The mixture's weight (beta for jsd, skew for the skew divergences) and the logs of the two
// weights log(mix), log(1 - mix) of the log-mixture. Unused (0) for the other divergences.
struct Mixture {
  float mix, log_w1, log_w2;
};

// ---- Logit transform: x = softcap(scale * z), cap 0 meaning none ----

// Keeps -inf (a masked entry). A literal cap of 0 folds the tanh away.
template <class M>
FASTKD_HD float transform(float z, float scale, float cap) {
  const float x = z * scale;
  return cap == 0.0f || x == -kInf ? x : cap * M::tanh(x / cap);
}

// g * dx/dz in terms of the output x of transform; 0 where x = -inf (no gradient into a
// masked logit).
FASTKD_HD float transform_grad(float g, float x, float scale, float cap) {
  const float dx = cap == 0.0f ? scale : scale * (1.0f - (x / cap) * (x / cap));
  return x == -kInf ? 0.0f : g * dx;
}

// log(e^(l1 + lw1) + e^(l2 + lw2)), -inf when both are -inf. Branch free (selects only).
template <class M>
FASTKD_HD float log_mix(float l1, float l2, float lw1, float lw2) {
  const float u = l1 + lw1, v = l2 + lw2;
  const float hi = u > v ? u : v, lo = u > v ? v : u;
  const float safe = hi == -kInf ? 0.0f : hi;
  return hi == -kInf ? -kInf : safe + M::log1p(M::exp(lo - safe));
}

// ---- Divergences (docs/design.md §2 table). Per KD column: lq = log q, lp = log p, q = e^lq,
// p = e^lp. A term whose leading probability is exactly 0 is 0 (no 0 * log 0 = NaN); one whose
// leading probability is positive against a partner of probability 0 (log -inf) is +inf
// (docs/design.md §3). ----

// kl and reverse_kl in one pass, before the log-sum-exps are known: this column's share of
// sum e_lead (lead - partner), lead and partner in the units of the logits x (kl: lead x_t,
// partner x_s, e_lead = e^((x_t - r_t) / T), r the running max; reverse_kl: swapped); the caller
// divides by T. A partner of -inf makes the term +inf or 0 by the lead's log-probability, which
// pass 1 does not know yet: such a column adds 0 here, and masked_lead() collects the lead for
// partner_masked_live().
//
// kSafe (the CUDA and Triton kernels; the CPU's rare tiles) takes any input: 0 where the partner
// is -inf, the difference clamped to the fp32 range (no 0 * inf where it overflows). The fast
// form (the CPU's common tiles) has two selects fewer and needs every partner >= -kHugeLogit and
// the running maxima within +-kHugeLogit / 2: then the difference cannot overflow, and a lead
// below -kHugeLogit, of probability 0, adds 0 (the -inf of a masked lead included).
constexpr float kHugeLogit = 0x1p126f;

template <bool kSafe>
FASTKD_HD float one_pass_term(float lead, float partner, float e_lead) {
  if constexpr (kSafe) {
    const float d = lead - partner;
    // The fp32 range, in the order that keeps a NaN (a select returns d when unordered).
    const float dc = -kMaxFloat > d ? -kMaxFloat : (kMaxFloat < d ? kMaxFloat : d);
    return partner > -kInf ? e_lead * dc : 0.0f;
  } else {
    return lead > -kHugeLogit ? e_lead * (lead - partner) : 0.0f;
  }
}

// The lead where the partner is -inf, else -inf: its running max is mi of partner_masked_live.
FASTKD_HD float masked_lead(float lead, float partner) {
  return partner > -kInf ? -kInf : lead;
}

// Whether some column with a partner of -inf has a lead probability above 0, i.e. whether kl
// (reverse_kl) is +inf: mi is the largest such lead logit, m the lead's max and log_s the log of
// its sum of e^((x - m) / T). F: the backend's accumulator type.
template <class F>
FASTKD_HD bool partner_masked_live(F mi, F m, F log_s, F inv_t) {
  return (mi - m) * inv_t - log_s > F(kLogMin);
}

// This column's shares of the sums a second pass takes once lse(a), lse(b) are known (jsd, tvd,
// skew divergences): `d` of the divergence's sum (divergence_of turns the row's sums into D) and
// `g` of G.
struct Terms {
  float d, g;
};

template <class M, int kDiv>
FASTKD_HD Terms two_pass_terms(float lq, float lp, float q, float p, const Mixture& w) {
  if constexpr (kDiv == kJSD) {  // d: p (lp - lm), g: q (lq - lm)
    const float lm = log_mix<M>(lp, lq, w.log_w1, w.log_w2);
    return {p > 0.0f ? p * (lp - lm) : 0.0f, q > 0.0f ? q * (lq - lm) : 0.0f};
  } else if constexpr (kDiv == kTVD) {  // d: |p - q|, g: q h
    return {p > q ? p - q : q - p, q > p ? 0.5f * q : (q < p ? -0.5f * q : 0.0f)};
  } else if constexpr (kDiv == kSkewKL) {  // d: p (lp - lm), g: q g = -(1 - l) q p / m
    const float lm = log_mix<M>(lp, lq, w.log_w1, w.log_w2);
    const float qg = -M::exp(w.log_w2 + lq + lp - lm);  // weights as logs: a tiny mix stays finite
    // q > 0 and p > 0, written as min(q, p) > 0: gcc 12 does not vectorise `a & b` here.
    return {p > 0.0f ? p * (lp - lm) : 0.0f, (q < p ? q : p) > 0.0f ? qg : 0.0f};
  } else if constexpr (kDiv == kSkewReverseKL) {  // d: q (lq - lm), g: d - l q^2 / m
    const float lm = log_mix<M>(lq, lp, w.log_w1, w.log_w2);
    const float tq = q > 0.0f ? q * (lq - lm) : 0.0f;
    return {tq, q > 0.0f ? tq - M::exp(w.log_w1 + 2.0f * lq - lm) : 0.0f};
  } else {
    return {0.0f, 0.0f};
  }
}

// D of a row from its sums of two_pass_terms (F: the backend's accumulator type).
template <int kDiv, class F>
FASTKD_HD F divergence_of(F sum_d, F sum_g, F mix) {
  if constexpr (kDiv == kJSD) {
    return mix * sum_d + (F(1) - mix) * sum_g;
  } else if constexpr (kDiv == kTVD) {
    return F(0.5) * sum_d;
  } else {
    return sum_d;
  }
}

// dD/da_j of one KD column, from the row's G (stats[:, 3]).
template <class M, int kDiv>
FASTKD_HD float kd_grad(float lq, float lp, float q, float p, float big_g, const Mixture& w) {
  if constexpr (kDiv == kKL) {
    return q - p;
  } else if constexpr (kDiv == kReverseKL) {
    return q > 0.0f ? q * (lq - lp - big_g) : 0.0f;
  } else if constexpr (kDiv == kJSD) {
    const float lm = log_mix<M>(lp, lq, w.log_w1, w.log_w2);
    return (1.0f - w.mix) * (q > 0.0f ? q * (lq - lm - big_g) : 0.0f);
  } else if constexpr (kDiv == kTVD) {
    const float h = q > p ? 0.5f : (q < p ? -0.5f : 0.0f);
    return q * (h - big_g);
  } else if constexpr (kDiv == kSkewKL) {
    const float lm = log_mix<M>(lp, lq, w.log_w1, w.log_w2);
    const float qg = -M::exp(w.log_w2 + lq + lp - lm);
    return ((q < p ? q : p) > 0.0f ? qg : 0.0f) - q * big_g;
  } else {  // kSkewReverseKL
    const float lm = log_mix<M>(lq, lp, w.log_w1, w.log_w2);
    const float qg = q * (lq - lm) - M::exp(w.log_w1 + 2.0f * lq - lm);
    return q > 0.0f ? qg - q * big_g : 0.0f;
  }
}

// Whether a row gets a KD gradient: not where its D is +inf (stats G = D for kl and reverse_kl;
// the other divergences are bounded). An infinite loss has no finite descent direction, so the
// row keeps only its CE gradient (docs/design.md §3).
FASTKD_HD bool kd_grad_on(float big_g) { return big_g != kInf; }

// ---- Cross-entropy ----

// dCE/dc_j = s1_j - [j == label], s1_j = e^(c_j - lse(c)).
FASTKD_HD float ce_grad(float s1, bool is_label) { return is_label ? s1 - 1.0f : s1; }

// The gradient of one row's loss with respect to x_s at a column, before transform_grad:
// kd_scale dD/da_j (KD columns; kd_scale = w grad_loss kd_weight T) + ce_scale dCE/dc_j
// (ce_scale = w grad_loss ce_weight).
FASTKD_HD float logit_grad(float kd_scale, float dd, float ce_scale, float dce) {
  return kd_scale * dd + ce_scale * dce;
}

// ---- Sparse KD: a cached top-k teacher (docs/design.md §11) ----
//
// The divergence of a row is taken over bins: the k cached ids K, plus in bucket mode (k < V)
// one tail bin holding the mass outside K. Each bin has log-probabilities lP (teacher) and lQ
// (student) made by k_bin_logs (and tail_bin) from the cached lp and the student's
// full-vocabulary lq = (x - T lse(x / T)) / T; D is the sum of bin_terms' d over the bins, and
// its gradient is made of the bins' g by sparse_factors and sparse_k_grad. The backends take the
// sums over the bins, the logs of the row's sums and the student's mass outside K.

// The tail modes in fastkd._options.TAILS order: X(enumerator, Python name). The code is the
// position (the ops' `tail` argument); fastkd._C.tail_codes() exports the names.
#define FASTKD_TAILS(X)          \
  X(kBucket, "bucket")           \
  X(kRenormalize, "renormalize") \
  X(kIgnore, "ignore")

enum Tail : int {
#define FASTKD_TAIL_ENUM(id, name) id,
  FASTKD_TAILS(FASTKD_TAIL_ENUM)
#undef FASTKD_TAIL_ENUM
  kNumTails
};

// The floor of a bucket tail's mass (TAIL_FLOOR): fp32 cannot resolve 1 - sum_K q much below
// k 2^-24, and a teacher tail rounded to 0 must not make reverse_kl +inf.
constexpr float kTailFloor = 0x1p-14f;

// Bucket mode's tail bin of a distribution whose K bins sum to s (the teacher's cached lp): its
// mass max(1 - s, kTailFloor) and the log of that, log1p(-min(s, 1 - kTailFloor)) (1 - s is exact
// in fp32 for s >= 1/2). NaN stays NaN. The student's tail is the mass the backend summed outside
// K, floored at kTailFloor: 1 - sum_K q would lose it to rounding where it is small.
struct TailBin {
  float mass, log;
};

template <class M>
FASTKD_HD TailBin tail_bin(float s) {
  const float sc = s > 1.0f - kTailFloor ? 1.0f - kTailFloor : s;
  return {1.0f - sc, M::log1p(-sc)};
}

// A K bin's log-probabilities from the cached lp and the student's full-vocabulary lq:
// bucket keeps both, ignore renormalizes the teacher over K, renormalize both. log_sp, log_sq:
// the logs of the row's sum_K p and sum_K q; a student with sum_K q = 0 (every gathered logit
// -inf) renormalizes to lQ = -inf, not NaN.
struct BinLogs {
  float lp, lq;
};

FASTKD_HD BinLogs k_bin_logs(int tail, float lp, float lq, float log_sp, float log_sq) {
  const float lq_norm = log_sq == -kInf ? -kInf : lq - log_sq;
  return {tail == kBucket ? lp : lp - log_sp, tail == kRenormalize ? lq_norm : lq};
}

// One bin's term d of D and g = dD/dlQ, from its log-probabilities lp (teacher) and lq
// (student). The dense conventions (docs/design.md §3): a leading log-probability <= kLogMin is
// a probability of 0 and its term is 0, a live one against a partner of -inf makes kl
// (reverse_kl) +inf, g is 0 where the leading probability is 0. Unlike the dense dD/da_j, g
// keeps the terms that sum to 0 over a whole distribution (reverse_kl's and skew_reverse_kl's
// +q): ignore mode's student bins do not sum to 1.
struct Bin {
  float d, g;
};

template <class M, int kDiv>
FASTKD_HD Bin bin_terms(float lp, float lq, const Mixture& w) {
  const float p = M::exp(lp), q = M::exp(lq);
  if constexpr (kDiv == kKL) {  // d: p (lp - lq), g: -p
    // Written `<= kLogMin ? 0`, not `> kLogMin ?`, so that a NaN stays NaN.
    return {lp <= kLogMin ? 0.0f : (lq == -kInf ? kInf : p * (lp - lq)), -p};
  } else if constexpr (kDiv == kReverseKL) {  // d: q (lq - lp), g: q (lq - lp + 1)
    const float d = lq <= kLogMin ? 0.0f : (lp == -kInf ? kInf : q * (lq - lp));
    return {d, q > 0.0f ? q * (lq - lp + 1.0f) : 0.0f};
  } else {
    const Terms t = two_pass_terms<M, kDiv>(lq, lp, q, p, w);
    if constexpr (kDiv == kJSD) {  // t: p (lp - lm), q (lq - lm)
      return {w.mix * t.d + (1.0f - w.mix) * t.g, (1.0f - w.mix) * t.g};
    } else if constexpr (kDiv == kTVD) {  // t: |p - q|, q h
      return {0.5f * t.d, t.g};
    } else if constexpr (kDiv == kSkewKL) {  // t: p (lp - lm), -(1 - l) q p / m
      return {t.d, t.g};
    } else {  // kSkewReverseKL; t: q (lq - lm), q (lq - lm) - l q^2 / m
      return {t.d, t.g + q};
    }
  }
}

// The gradient of D with respect to a = x / T: q_j A at a column j outside K, g_j - r_j C at a
// column j of K (g_j of its bin; r_j = q_j, or Q_j = e^lQ_j in renormalize mode), with
//   C = G_K + g_tail q_raw / q_tail,  A = g_tail / q_tail - C  (bucket, ignore),  A = 0
// (renormalize: its bins do not depend on the columns outside K). G_K = sum_K g; g_tail and
// q_tail (floored) of the tail bin, 0 and 1 without one; q_raw = 1 - sum_K q, the student's mass
// outside K. d lQ_tail / da_j = (q_j [j not in K] - q_raw q_j) / q_tail, straight through the
// floor. This is the spec's q_j A + g_j - q_j g_tail / q_tail at K without its two terms of
// q_j g_tail / q_tail, which are large and cancel where the student's tail is small.
// F: the backend's accumulator type.
template <class F>
struct SparseFactors {
  F a, c;
};

template <class F>
FASTKD_HD SparseFactors<F> sparse_factors(int tail, F g_tail, F q_raw, F q_tail, F g_k) {
  const F c = g_k + g_tail * q_raw / q_tail;
  return {tail == kRenormalize ? F(0) : g_tail / q_tail - c, c};
}

// dD/da_j at a column of K, g - r_j c: lq is the column's full-vocabulary lq, lq_bin its bin's lQ.
template <class M>
FASTKD_HD float sparse_k_grad(int tail, float g, float lq, float lq_bin, float c) {
  return g - M::exp(tail == kRenormalize ? lq_bin : lq) * c;
}

}  // namespace fastkd
