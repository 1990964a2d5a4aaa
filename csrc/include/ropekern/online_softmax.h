// Online softmax state for one query row (FlashAttention-2), fp32, shared by CPU and CUDA kernels.
//
// Masked scores are -inf. A row whose running max is still -inf has seen no key: its scale
// factors are taken as 0 by selection (never by computing exp(-inf - -inf) = NaN), and it
// finishes as zeros with LSE -inf. Probabilities of masked keys are selected to 0, never
// multiplied, so NaN in an unused K/V slot cannot leak.
#pragma once

#include <math.h>

#include "macros.h"

namespace ropekern {

struct SoftmaxRow {
  float m = -INFINITY;  // running max of the scaled scores
  float l = 0.0f;       // running sum of exp(score - m)

  // Fold in a new block maximum; returns the factor to rescale the accumulator by.
  RK_HOST_DEVICE float update_max(float block_max) {
    const float m_new = fmaxf(m, block_max);
    const float alpha = (m == -INFINITY) ? 0.0f : expf(m - m_new);
    l *= alpha;
    m = m_new;
    return alpha;
  }

  // exp(score - m) for a score already folded into m; 0 for masked (-inf) scores.
  RK_HOST_DEVICE float prob(float score) const { return (score == -INFINITY) ? 0.0f : expf(score - m); }

  // 1 / l for the final normalisation, 0 for a row that saw no key.
  RK_HOST_DEVICE float inv_sum() const { return l > 0.0f ? 1.0f / l : 0.0f; }

  // Natural-log LSE of the scaled scores; -inf for a row that saw no key.
  RK_HOST_DEVICE float lse() const { return l > 0.0f ? m + logf(l) : -INFINITY; }
};

// Merge two partial results (split-K / ring attention): returns the weights of each part.
RK_HOST_DEVICE void merge_weights(float lse_a, float lse_b, float* w_a, float* w_b, float* lse_out) {
  const float m = fmaxf(lse_a, lse_b);
  if (m == -INFINITY) {
    *w_a = 0.0f;
    *w_b = 0.0f;
    *lse_out = -INFINITY;
    return;
  }
  const float ea = (lse_a == -INFINITY) ? 0.0f : expf(lse_a - m);
  const float eb = (lse_b == -INFINITY) ? 0.0f : expf(lse_b - m);
  const float s = ea + eb;
  *w_a = ea / s;
  *w_b = eb / s;
  *lse_out = m + logf(s);
}

}  // namespace ropekern
