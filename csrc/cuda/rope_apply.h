// apply_rope on the GPU: a rotated copy of x. One thread per (token, pair slot); it forms the
// slot's cos/sin once (accurate angles, ropekern/rope_math.h, or read from a caller's table when
// RopeParams::table_positions > 0) and applies it to every head. Slots past rotary_dim / 2 copy
// the pass-through channels bit-exact.
#pragma once

#include "common.h"
#include "cuda_params.h"
#include "ropekern/rope_math.h"

namespace ropekern {
namespace cuda {

template <typename Element>
RK_GLOBAL void apply_rope_kernel(const RopeApplyParams p) {
  using Cvt = Convert<Element>;
  const int rotary_dim = p.rope.rotary_dim, half = rotary_dim / 2;
  const int slots = half + (p.head_dim - rotary_dim + 1) / 2;  // rotated pairs, then pass-through pairs
  const int64_t total = static_cast<int64_t>(p.batch) * p.seqlen * slots;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += step) {
    const int slot = static_cast<int>(e % slots);
    const int64_t token = e / slots;
    const int s = static_cast<int>(token % p.seqlen);
    const int b = static_cast<int>(token / p.seqlen);
    const Element* x = static_cast<const Element*>(p.x) + b * p.x_batch_stride + s * p.x_row_stride;
    Element* o = static_cast<Element*>(p.out) + b * p.o_batch_stride + s * p.o_row_stride;
    if (slot < half) {
      const int32_t pos = p.positions[b * p.pos_batch_stride + s];
      float c, sn;
      if (p.rope.table_positions > 0) {
        table_cos_sin(p.rope.freqs, rotary_dim, p.rope.table_positions, pos, slot, &c, &sn);
      } else {
        rope_cos_sin(pos, sequence_freqs(p.rope, b), half, slot, p.rope.attention_factor, &c, &sn);
      }
      const int c1 = pair_first(slot, p.rope.interleaved), c2 = pair_second(slot, rotary_dim, p.rope.interleaved);
      for (int h = 0; h < p.num_heads; ++h) {
        float x1 = Cvt::to_float(x[h * p.x_head_stride + c1]);
        float x2 = Cvt::to_float(x[h * p.x_head_stride + c2]);
        rotate_pair(&x1, &x2, c, sn);
        o[h * p.o_head_stride + c1] = Cvt::from_float(x1);
        o[h * p.o_head_stride + c2] = Cvt::from_float(x2);
      }
    } else {
      const int c = rotary_dim + 2 * (slot - half);
      for (int h = 0; h < p.num_heads; ++h) {
        o[h * p.o_head_stride + c] = x[h * p.x_head_stride + c];
        if (c + 1 < p.head_dim) o[h * p.o_head_stride + c + 1] = x[h * p.x_head_stride + c + 1];
      }
    }
  }
}

}  // namespace cuda
}  // namespace ropekern
