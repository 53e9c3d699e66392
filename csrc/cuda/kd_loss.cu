// CUDA kernels of fastkd::kd_loss_fwd and fastkd::kd_loss_bwd, and their launchers (kd_loss.h).
// Contract: docs/design.md §2; executable truth: fastkd/reference.py; the algorithm and stats
// layout of the Triton kernels in kernels/kd_loss.py. The per-column math is csrc/kd_math.h's,
// which the CPU kernels run too (docs/design.md §3), with the math policy CudaMath below.
//
// One thread block per row (a grid-stride loop over rows). The threads stream the row in 16-byte
// chunks (8 bf16/fp16 or 4 fp32 columns: one vector load per tensor); columns before the first
// 16-byte boundary of the student row and after its last full chunk are read one by one. Each
// thread keeps a running max and sum per softmax (rescaled only when its max grows), and one
// block reduction merges them. jsd, tvd and the skew divergences then re-read the row at once
// in the same block, while it is still in L2. The gradient is written with 16-byte stores where
// the grad row has the student row's alignment. Math is fp32; expf/logf are the accurate ones
// (no fast-math), so results match the fp64 reference at fp32 rounding.
//
// No torch header here: nvcc compiles this file alone where torch has no CUDA (docs/design.md §6).
#include "cuda/kd_loss.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "kd_math.h"

namespace fastkd::cuda {
namespace {

// The math policy of kd_math.h's element functions: libdevice's accurate functions (the build
// has no --use_fast_math).
struct CudaMath {
  static FASTKD_HD float exp(float x) { return expf(x); }
  static FASTKD_HD float log1p(float x) { return log1pf(x); }
  static FASTKD_HD float tanh(float x) { return tanhf(x); }
};
using M = CudaMath;

constexpr float kNegInf = -kInf;
// Threads per block, at most: two blocks (rows) per SM at <= 64 registers a thread, so one row's
// reductions overlap the other's loads.
constexpr int kMaxThreads = 512;
constexpr int kMinBlocksPerSM = 2;

// Element types: fp32 math whatever the dtype, gradients rounded to nearest even on the store.
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float2 to_float2(__nv_bfloat162 v) { return __bfloat1622float2(v); }
__device__ __forceinline__ float2 to_float2(__half2 v) { return __half22float2(v); }

template <class T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

template <class T2>
__device__ __forceinline__ T2 from_float2(float a, float b);
template <>
__device__ __forceinline__ __nv_bfloat162 from_float2<__nv_bfloat162>(float a, float b) {
  return __floats2bfloat162_rn(a, b);
}
template <>
__device__ __forceinline__ __half2 from_float2<__half2>(float a, float b) {
  return __floats2half2_rn(a, b);
}

// A 16-byte store to global memory (p 16-byte aligned): one STG.E.128. Written as a plain uint4 or
// float4 store, nvcc 13 splits it into 32- or 64-bit stores here; __stwb would keep 128 bits but
// compiles to a strong (.STRONG.SM) store.
__device__ __forceinline__ void store16(void* p, uint4 v) {
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z),
               "r"(v.w)
               : "memory");
}

// One 16-byte load or store of kN columns (the pointer must be 16-byte aligned).
template <class T>
struct Vec {  // bf16, fp16: four packed pairs
  using T2 = std::conditional_t<std::is_same_v<T, __half>, __half2, __nv_bfloat162>;
  static constexpr int kN = 8;
  __device__ static void load(const T* p, float (&x)[kN]) {
    const uint4 v = *reinterpret_cast<const uint4*>(p);
    const T2* h = reinterpret_cast<const T2*>(&v);
#pragma unroll
    for (int i = 0; i < kN / 2; ++i) {
      const float2 f = to_float2(h[i]);
      x[2 * i] = f.x;
      x[2 * i + 1] = f.y;
    }
  }
  __device__ static void store(T* p, const float (&x)[kN]) {
    uint4 v;
    T2* h = reinterpret_cast<T2*>(&v);
#pragma unroll
    for (int i = 0; i < kN / 2; ++i) h[i] = from_float2<T2>(x[2 * i], x[2 * i + 1]);
    store16(p, v);
  }
};

template <>
struct Vec<float> {
  static constexpr int kN = 4;
  __device__ static void load(const float* p, float (&x)[kN]) {
    const float4 v = *reinterpret_cast<const float4*>(p);
    x[0] = v.x;
    x[1] = v.y;
    x[2] = v.z;
    x[3] = v.w;
  }
  __device__ static void store(float* p, const float (&x)[kN]) {
    store16(p, make_uint4(__float_as_uint(x[0]), __float_as_uint(x[1]), __float_as_uint(x[2]),
                          __float_as_uint(x[3])));
  }
};

// Columns of a row starting at p before its first 16-byte boundary.
template <class T>
__device__ __forceinline__ int aligned_head(const T* p, int ncols) {
  const int mis = static_cast<int>(reinterpret_cast<uintptr_t>(p) % 16);
  return min(ncols, mis == 0 ? 0 : (16 - mis) / static_cast<int>(sizeof(T)));
}

template <class T>
__device__ __forceinline__ bool aligned16(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// This thread's share of columns [0, ncols): body(j) for the V-wide chunks from column h on
// (adjacent threads take adjacent chunks: coalesced), single(j) for the columns before h and
// after the last full chunk (fewer than 2V).
template <int V, class Body, class Single>
__device__ __forceinline__ void partition(int h, int ncols, Body&& body, Single&& single) {
  const int nb = (ncols - h) / V;
  for (int c = threadIdx.x; c < nb; c += blockDim.x) body(h + c * V);
  const int tail = h + nb * V;
  const int ns = h + ncols - tail;
  for (int i = threadIdx.x; i < ns; i += blockDim.x) single(i < h ? i : tail + (i - h));
}

// Columns j .. j+N-1 of a row: x the transformed student logits, b the transformed teacher
// logits x_t for the teacher columns < tlim and -inf past them. Logit units throughout: the
// kernels form (x - ref) / T, never x / T, which overflows where T < 1 (docs/design.md §3).
template <int N>
struct Chunk {
  int j;
  float x[N];
  float b[N];
};

template <class T, int N>
__device__ __forceinline__ void load_student(const T* s, int j, const KDParams& a, float (&x)[N]) {
  if constexpr (N == 1) {
    x[0] = to_float(s[j]);
  } else {
    Vec<T>::load(s + j, x);
  }
#pragma unroll
  for (int k = 0; k < N; ++k) x[k] = transform<M>(x[k], a.s_scale, a.s_cap);
}

template <class T, int N>
__device__ __forceinline__ void load_teacher(const T* t, int j, int tlim, bool vec,
                                             const KDParams& a, float (&b)[N]) {
  bool done = false;
  if constexpr (N > 1) {
    if (vec && j + N <= tlim) {
      Vec<T>::load(t + j, b);
      done = true;
    }
  }
  if (!done) {
#pragma unroll
    for (int k = 0; k < N; ++k) b[k] = j + k < tlim ? to_float(t[j + k]) : kNegInf;
  }
#pragma unroll
  for (int k = 0; k < N; ++k) b[k] = transform<M>(b[k], a.t_scale, a.t_cap);
}

// Calls f(chunk) on this thread's columns of [0, ncols) of one row; h = aligned_head(s, .).
// The teacher is read with vector loads where its row has the student row's alignment.
template <class T, class F>
__device__ __forceinline__ void for_chunks(const T* s, const T* t, int h, int ncols, int tlim,
                                           const KDParams& a, F&& f) {
  constexpr int V = Vec<T>::kN;
  const bool t_vec = aligned16(t + h);
  const auto visit = [&](int j, auto width) {
    Chunk<decltype(width)::value> ch;
    ch.j = j;
    load_student<T>(s, j, a, ch.x);
    load_teacher<T>(t, j, tlim, t_vec, a, ch.b);
    f(ch);
  };
  partition<V>(
      h, ncols, [&](int j) { visit(j, std::integral_constant<int, V>{}); },
      [&](int j) { visit(j, std::integral_constant<int, 1>{}); });
}

// The width N of a Chunk<N>, from a (const) reference to it.
template <class C>
constexpr int width_of = std::extent_v<decltype(std::declval<C>().x)>;

// acc * r, except that an infinite divergence stays infinite where r underflows to 0.
__device__ __forceinline__ float rescale(float acc, float r) {
  return fabsf(acc) == kInf ? acc : acc * r;
}

// Running max m and sum s of e^((x - ref()) inv_t) over the values seen so far (x in logit
// units; inv_t = 1 / T, 1 for the CE).
struct Online {
  float inv_t;
  float m = kNegInf;
  float s = 0.0f;

  // Raises the max to cover values whose max is mx; returns the factor the sums were scaled by.
  __device__ float raise(float mx) {
    if (!(mx > m)) return 1.0f;
    const float r = M::exp((m - mx) * inv_t);
    s *= r;
    m = mx;
    return r;
  }
  // Finite point the sums are relative to: an all -inf prefix keeps sum 0 without a NaN.
  __device__ float ref() const { return m == kNegInf ? 0.0f : m; }
};

template <int K>
struct Pack {
  float v[K];
};

// Reduction of one Pack per thread with a commutative op; every thread gets the result.
// blockDim.x is a power of two >= 64. Safe to call back to back (the two barriers order the
// shared slots' reuse).
template <int K, class Op>
__device__ __forceinline__ Pack<K> block_allreduce(Pack<K> x, Op op) {
  __shared__ Pack<K> partial[32];
  __shared__ Pack<K> total;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
  const auto warp_reduce = [&](int width) {
    for (int o = width / 2; o > 0; o /= 2) {
      Pack<K> y;
#pragma unroll
      for (int k = 0; k < K; ++k) y.v[k] = __shfl_xor_sync(0xffffffffu, x.v[k], o);
      x = op(x, y);
    }
  };
  warp_reduce(32);
  if (lane == 0) partial[warp] = x;
  __syncthreads();
  if (warp == 0) {
    x = partial[lane % nwarps];
    warp_reduce(nwarps);
    if (lane == 0) total = x;
  }
  __syncthreads();
  return total;
}

// Forward: loss[row] and stats[row] = (lse(a), lse(b), lse(c), G) (docs/design.md §2).
template <class T, int kDiv>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocksPerSM)
    kd_fwd_kernel(const KDParams a, float* __restrict__ loss, float* __restrict__ stats) {
  const int vs = static_cast<int>(a.vs), kv = static_cast<int>(a.kv);
  const int tlim = a.has_kd ? static_cast<int>(min(a.vt, a.kv)) : 0;
  const int ncols = a.has_ce ? vs : (a.has_kd ? kv : 0);
  for (int64_t row = blockIdx.x; row < a.n; row += gridDim.x) {
    int64_t y;
    const float w = row_weight(a, row, y);
    float* st = stats + 4 * row;
    if (w == 0.0f) {  // the row is not read
      if (threadIdx.x == 0) {
        loss[row] = 0.0f;
        st[0] = st[1] = st[2] = st[3] = 0.0f;
      }
      continue;
    }
    const T* s = static_cast<const T*>(a.student) + row * a.s_stride;
    const T* t = static_cast<const T*>(a.teacher) + row * a.t_stride;

    // Pass 1: online softmax of a = x_s / T and b = x_t / T over the KD columns and of c = x_s
    // over all columns (maxima in logit units); acc is the sum of one_pass_term and mi the max of
    // masked_lead (kl, reverse_kl).
    const float inv_t = a.inv_t;
    Online A{inv_t}, B{inv_t}, C{1.0f};
    float acc = 0.0f, mi = kNegInf;
    for_chunks(s, t, aligned_head(s, ncols), ncols, tlim, a, [&](const auto& ch) {
      constexpr int N = width_of<decltype(ch)>;
      if (a.has_kd) {
        float xa[N];  // x_s on the KD columns, -inf elsewhere
        float ma = kNegInf, mb = kNegInf;
#pragma unroll
        for (int k = 0; k < N; ++k) {
          xa[k] = ch.j + k < kv ? ch.x[k] : kNegInf;
          ma = fmaxf(ma, xa[k]);
          mb = fmaxf(mb, ch.b[k]);
        }
        const float ra = A.raise(ma), rb = B.raise(mb);
        const float ref_a = A.ref(), ref_b = B.ref();
        float sa = 0.0f, sb = 0.0f, part = 0.0f;
#pragma unroll
        for (int k = 0; k < N; ++k) {
          const float ea = M::exp((xa[k] - ref_a) * inv_t), eb = M::exp((ch.b[k] - ref_b) * inv_t);
          sa += ea;
          sb += eb;
          if constexpr (kDiv == kKL) {
            part += one_pass_term<true>(ch.b[k], xa[k], eb);
            mi = fmaxf(mi, masked_lead(ch.b[k], xa[k]));
          } else if constexpr (kDiv == kReverseKL) {
            part += one_pass_term<true>(xa[k], ch.b[k], ea);
            mi = fmaxf(mi, masked_lead(xa[k], ch.b[k]));
          }
        }
        A.s += sa;
        B.s += sb;
        acc = rescale(acc, kDiv == kKL ? rb : ra) + part;  // 0 for the other divergences
      }
      if (a.has_ce) {
        float mc = kNegInf;
#pragma unroll
        for (int k = 0; k < N; ++k) mc = fmaxf(mc, ch.x[k]);
        C.raise(mc);
        const float ref_c = C.ref();
        float sc = 0.0f;
#pragma unroll
        for (int k = 0; k < N; ++k) sc += M::exp(ch.x[k] - ref_c);
        C.s += sc;
      }
    });

    // Merge the threads' (max, sum) pairs: v = (mA, sA, mB, sB, mC, sC, acc, mi).
    const Pack<8> r = block_allreduce(
        Pack<8>{{A.m, A.s, B.m, B.s, C.m, C.s, acc, mi}}, [inv_t](Pack<8> x, const Pack<8>& o) {
          float fx[3], fo[3];
#pragma unroll
          for (int i = 0; i < 3; ++i) {
            const float m = fmaxf(x.v[2 * i], o.v[2 * i]);
            const float ref = m == kNegInf ? 0.0f : m;
            const float it = i < 2 ? inv_t : 1.0f;
            fx[i] = M::exp((x.v[2 * i] - ref) * it);
            fo[i] = M::exp((o.v[2 * i] - ref) * it);
            x.v[2 * i + 1] = x.v[2 * i + 1] * fx[i] + o.v[2 * i + 1] * fo[i];
            x.v[2 * i] = m;
          }
          constexpr int i = kDiv == kKL ? 1 : 0;  // acc follows B for kl, A for reverse_kl
          x.v[6] = rescale(x.v[6], fx[i]) + rescale(o.v[6], fo[i]);
          x.v[7] = fmaxf(x.v[7], o.v[7]);
          return x;
        });
    const float m_a = r.v[0], s_a = r.v[1], m_b = r.v[2], s_b = r.v[3], m_c = r.v[4],
                s_c = r.v[5];

    // The stats' log-sum-exps in logit units: T lse(a), T lse(b), lse(c).
    float tla = 0.0f, tlb = 0.0f, lc = 0.0f, big_g = 0.0f, total = 0.0f;
    if (a.has_kd) {
      tla = m_a + a.temp * logf(s_a);
      tlb = m_b + a.temp * logf(s_b);
      float d;
      // kl and reverse_kl from pass 1: lse(a) - lse(b) is taken as (m_a - m_b) / T +
      // log(s_a / s_b), which keeps the cancellation of the two log-sum-exps at the rounding of
      // the small result. G = D: the backward tests it for +inf (kd_grad_on).
      if constexpr (kDiv == kKL) {
        d = partner_masked_live(r.v[7], m_b, logf(s_b), inv_t)
                ? kInf
                : r.v[6] * inv_t / s_b + (m_a - m_b) * inv_t + logf(s_a / s_b);
        big_g = d;
      } else if constexpr (kDiv == kReverseKL) {
        d = partner_masked_live(r.v[7], m_a, logf(s_a), inv_t)
                ? kInf
                : r.v[6] * inv_t / s_a + (m_b - m_a) * inv_t + logf(s_b / s_a);
        big_g = d;
      } else {
        // Pass 2 over the KD columns, once the log-sum-exps are known: the sums of
        // two_pass_terms.
        float sd = 0.0f, sg = 0.0f;
        for_chunks(s, t, aligned_head(s, kv), kv, tlim, a, [&](const auto& ch) {
          constexpr int N = width_of<decltype(ch)>;
#pragma unroll
          for (int k = 0; k < N; ++k) {
            const float lq = (ch.x[k] - tla) * inv_t, lp = (ch.b[k] - tlb) * inv_t;
            const Terms tk = two_pass_terms<M, kDiv>(lq, lp, M::exp(lq), M::exp(lp), a.mix);
            sd += tk.d;
            sg += tk.g;
          }
        });
        const Pack<2> sums = block_allreduce(Pack<2>{{sd, sg}}, [](Pack<2> x, const Pack<2>& o) {
          x.v[0] += o.v[0];
          x.v[1] += o.v[1];
          return x;
        });
        d = divergence_of<kDiv>(sums.v[0], sums.v[1], a.mix.mix);
        big_g = sums.v[1];
      }
      total = a.kd_w * (a.temp * a.temp * d);  // kd_w T^2 can underflow (a subnormal kd_w)
    }
    if (a.has_ce) lc = m_c + logf(s_c);
    if (threadIdx.x == 0) {
      if (a.has_ce) {
        // An out-of-range label gives NaN (the contract: no host check on the device). The CE
        // is (m_c - c_y) + log s_c, exact where c_y is near the max at any magnitude.
        const bool valid = y >= 0 && y < vs;
        const float ce =
            valid ? (m_c - transform<M>(to_float(s[y]), a.s_scale, a.s_cap)) + logf(s_c) : NAN;
        total += a.ce_w * ce;
      }
      loss[row] = w * total;
      st[0] = tla;
      st[1] = tlb;
      st[2] = lc;
      st[3] = big_g;
    }
  }
}

template <class T, int N>
__device__ __forceinline__ void store_chunk(T* g, int j, const float (&v)[N], bool vec) {
  if constexpr (N > 1) {
    if (vec) {
      Vec<T>::store(g + j, v);
      return;
    }
  }
#pragma unroll
  for (int k = 0; k < N; ++k) g[j + k] = from_float<T>(v[k]);
}

// Backward: grad[row] = grad_loss[row] * d loss[row] / d student[row], one pass. grad may be the
// student itself: every element is read (into its chunk) by the thread that later writes it.
template <class T, int kDiv>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocksPerSM)
    kd_bwd_kernel(const KDParams a, const KDGrad gr) {
  constexpr int V = Vec<T>::kN;
  const int vs = static_cast<int>(a.vs), kv = static_cast<int>(a.kv);
  const int tlim = a.has_kd ? static_cast<int>(min(a.vt, a.kv)) : 0;
  for (int64_t row = blockIdx.x; row < a.n; row += gridDim.x) {
    int64_t y;
    const float w = row_weight(a, row, y);
    T* g = static_cast<T*>(gr.grad) + row * gr.g_stride;
    if (w == 0.0f) {  // zero gradient, the row is not read
      const float zero[V] = {};
      partition<V>(
          aligned_head(g, vs), vs, [&](int j) { Vec<T>::store(g + j, zero); },
          [&](int j) { g[j] = from_float<T>(0.0f); });
      continue;
    }
    const T* s = static_cast<const T*>(a.student) + row * a.s_stride;
    const T* t = static_cast<const T*>(a.teacher) + row * a.t_stride;
    const float scale = w * gr.grad_loss[row * gr.gl_stride];
    const float* st = gr.stats + 4 * row;
    const float tla = st[0], tlb = st[1], lc = st[2], big_g = st[3], inv_t = a.inv_t;
    const bool kd_on = a.has_kd && kd_grad_on(big_g);
    const float kd_scale = scale * a.kd_w * a.temp, ce_scale = scale * a.ce_w;
    const int h = aligned_head(s, vs);
    const bool g_vec = aligned16(g + h);
    for_chunks(s, t, h, vs, tlim, a, [&](const auto& ch) {
      constexpr int N = width_of<decltype(ch)>;
      float out[N];
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const int j = ch.j + k;
        const float x = ch.x[k], lq = (x - tla) * inv_t, lp = (ch.b[k] - tlb) * inv_t;
        const float dd = kd_on && j < kv
                             ? kd_grad<M, kDiv>(lq, lp, M::exp(lq), M::exp(lp), big_g, a.mix)
                             : 0.0f;
        const float dce = a.has_ce ? ce_grad(M::exp(x - lc), j == y) : 0.0f;
        out[k] = transform_grad(logit_grad(kd_scale, dd, ce_scale, dce), x, a.s_scale, a.s_cap);
      }
      store_chunk<T>(g, ch.j, out, g_vec);
    });
  }
}

// Threads per row: at least 64 columns per thread before the block grows.
int threads_for(int64_t vs) {
  int threads = 128;
  while (threads < kMaxThreads && threads * 64 < vs) threads *= 2;
  return threads;
}

unsigned grid_for(int64_t n) { return static_cast<unsigned>(std::min<int64_t>(n, INT32_MAX)); }

// Launches f(T{}, integral_constant<int, divergence>{}) for the call's dtype and divergence, so
// every combination gets its own kernels with no branch on them inside.
template <class F>
cudaError_t with_kernel_types(const KDParams& p, F&& f) {
  const auto with_type = [&](auto type) {
    return with_divergence(p.divergence, [&](auto div) { return f(type, div); });
  };
  switch (p.dtype) {
    case Dtype::kFloat32: return with_type(float{});
    case Dtype::kBFloat16: return with_type(__nv_bfloat16{});
    case Dtype::kFloat16: return with_type(__half{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t kd_loss_fwd_launch(const KDParams& p, float* loss, float* stats,
                               cudaStream_t stream) {
  return with_kernel_types(p, [&](auto type, auto div) {
    kd_fwd_kernel<decltype(type), decltype(div)::value>
        <<<grid_for(p.n), threads_for(p.vs), 0, stream>>>(p, loss, stats);
    return cudaGetLastError();
  });
}

cudaError_t kd_loss_bwd_launch(const KDParams& p, const KDGrad& g, cudaStream_t stream) {
  return with_kernel_types(p, [&](auto type, auto div) {
    kd_bwd_kernel<decltype(type), decltype(div)::value>
        <<<grid_for(p.n), threads_for(p.vs), 0, stream>>>(p, g);
    return cudaGetLastError();
  });
}

}  // namespace fastkd::cuda
