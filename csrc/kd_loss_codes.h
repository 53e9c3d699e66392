// What every native backend of fastkd::kd_loss_fwd / kd_loss_bwd shares below torch: the
// divergence codes. Plain C++, so nvcc compiles it where torch has no CUDA.
#pragma once

#include <cstdint>

namespace fastkd {

// fastkd._options.DIVERGENCES order (the ops' `divergence` argument).
enum Divergence : int { kKL, kReverseKL, kJSD, kTVD, kSkewKL, kSkewReverseKL, kNumDivergences };

// The divergences through a mixture m of p and q, weighted by `mix` (beta or skew).
constexpr bool is_mixture(int64_t divergence) {
  return divergence == kJSD || divergence == kSkewKL || divergence == kSkewReverseKL;
}

}  // namespace fastkd
