// Scalar float math written so that gcc/clang vectorise it inside `#pragma omp simd` loops:
// no calls into libm, no branches (selects only), bit casts through memcpy. libm's expf/logf
// are never vectorised without -ffast-math, which the kernels cannot use (they rely on
// -inf and NaN behaving as IEEE says). Polynomials are Cephes' (expf, logf, tanhf), about
// 1 ulp in fp32. Every function is always_inline so that it is compiled for the instruction
// set of the (multiversioned) kernel that calls it. CpuMath, at the end, is the math policy of
// the element functions of csrc/kd_math.h (docs/design.md §3).
#pragma once

#include <cstdint>
#include <cstring>

#include "kd_math.h"

namespace fastkd::cpu {

FASTKD_HD uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

FASTKD_HD float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// e^x. x < ln(2^-126) (-inf included) gives 0, x > 127.5 ln 2 gives inf, NaN stays NaN.
FASTKD_HD float exp_f(float x) {
  constexpr float kMin = -87.33654475f, kMax = 88.37626266f;
  constexpr float kShift = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float xc = x < kMin ? kMin : (x > kMax ? kMax : x);
  // n = round(x / ln 2) sits in the low mantissa bits of t; r = x - n ln 2 in two parts
  // (Cody-Waite), so that r is exact to fp32 rounding.
  const float t = xc * 1.44269504088896341f + kShift;
  const float n = t - kShift;
  const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float er = p * (r * r) + r + 1.0f;
  // 2^n: t's bit pattern is 0x4b400000 + n, so (pattern + 127) << 23 keeps exactly the biased
  // exponent n + 127 (n is in [-126, 127]).
  const float scale = from_bits((bits_of(t) + 127u) << 23);
  const float y = er * scale;
  return x < kMin ? 0.0f : (x > kMax ? kInf : y);
}

// log x for positive normal x (the kernels take it of values in [1, 2] only).
FASTKD_HD float log_f(float x) {
  const uint32_t u = bits_of(x);
  float e = static_cast<float>(static_cast<int32_t>(u >> 23) - 126);
  float m = from_bits((u & 0x007fffffu) | 0x3f000000u);  // x = m 2^e, m in [0.5, 1)
  const bool low = m < 0.707106781186547524f;
  e = low ? e - 1.0f : e;
  m = low ? m + m - 1.0f : m - 1.0f;  // now log x = log1p(m) + e ln 2, |m| < 0.42
  const float z = m * m;
  float p = 7.0376836292e-2f;
  p = p * m - 1.1514610310e-1f;
  p = p * m + 1.1676998740e-1f;
  p = p * m - 1.2420140846e-1f;
  p = p * m + 1.4249322787e-1f;
  p = p * m - 1.6668057665e-1f;
  p = p * m + 2.0000714765e-1f;
  p = p * m - 2.4999993993e-1f;
  p = p * m + 3.3333331174e-1f;
  const float y = p * m * z - 2.12194440e-4f * e - 0.5f * z;
  return (m + y) + 0.693359375f * e;
}

// log(1 + x) for x in [0, 1], accurate for small x too (Kahan: the rounding of 1 + x is
// divided back out).
FASTKD_HD float log1p_f(float x) {
  const float u = 1.0f + x;
  const float d = u - 1.0f;
  return d == 0.0f ? x : log_f(u) * (x / d);
}

FASTKD_HD float tanh_f(float x) {
  const float z = x < 0.0f ? -x : x;
  const float s = z * z;
  float p = -5.70498872745e-3f;
  p = p * s + 2.06390887954e-2f;
  p = p * s - 5.37397155531e-2f;
  p = p * s + 1.33314422036e-1f;
  p = p * s - 3.33332819422e-1f;
  const float small = p * s * z + z;
  const float e = exp_f(-2.0f * z);  // <= e^-1.25 where used: 1 - e loses nothing
  const float big = (1.0f - e) / (1.0f + e);
  const float t = z < 0.625f ? small : big;
  return x < 0.0f ? -t : t;
}

// bf16 is the high half of an fp32; rounding back is to nearest even, NaN stays a quiet NaN.
FASTKD_HD float bf16_to_float(uint16_t h) { return from_bits(static_cast<uint32_t>(h) << 16); }

FASTKD_HD uint16_t float_to_bf16(float f) {
  const uint32_t u = bits_of(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(f != f ? 0x7fc0u : rounded);
}

// IEEE half <-> float without F16C, branch free (the bit tricks of the FP16 library, which
// c10::Half uses too): gcc does not vectorise _Float16 conversions, this vectorises.
FASTKD_HD float half_to_float(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  // Normal numbers (and inf/NaN): move exponent and mantissa into place, then rebias by
  // multiplying with 2^-112. Denormals (m 2^-24, m the 10-bit mantissa): build the float
  // 0.5 + m 2^-24 and subtract 0.5.
  const float normal = from_bits((two_w >> 4) + (0xe0u << 23)) * 0x1.0p-112f;
  const float denormal = from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t magnitude = two_w < (1u << 27) ? bits_of(denormal) : bits_of(normal);
  return from_bits(sign | magnitude);
}

FASTKD_HD uint16_t float_to_half(float f) {
  const uint32_t w = bits_of(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  // Scaling up then down lets the FPU round the mantissa to 10 bits (and overflow to inf).
  float base = ((f < 0.0f ? -f : f) * 0x1.0p+112f) * 0x1.0p-110f;
  uint32_t bias = shl1_w & 0xff000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  base = from_bits((bias >> 1) + 0x07800000u) + base;
  const uint32_t b = bits_of(base);
  const uint32_t nonsign = ((b >> 13) & 0x00007c00u) + (b & 0x00000fffu);
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xff000000u ? 0x7e00u : nonsign));
}

// The math policy of the CPU kernels: kd_math.h's element functions with these polynomials.
struct CpuMath {
  static FASTKD_HD float exp(float x) { return exp_f(x); }
  static FASTKD_HD float log1p(float x) { return log1p_f(x); }
  static FASTKD_HD float tanh(float x) { return tanh_f(x); }
};

}  // namespace fastkd::cpu
