// Attention-dropout keep bits of one warp's mma accumulator fragment (csrc/common/philox.h has the counter
// layout; longattn/_dropout.py is the specification). Only compiled into the kernels' kDropout = true
// instantiations: without dropout none of this exists in the binary.
//
// A fragment element (n-tile n, element e) of lane L sits at row L/4 (+8 for e >= 2) and column
// n*8 + (L%4)*2 + (e&1) of the warp's 16 rows (tile_ops.h, frag_row / frag_col). Key tiles start at
// multiples of 64 (band and side alike), so a 4-key Philox group never straddles a tile, and every Philox
// call's four words are used by exactly four fragment elements: 8 calls per lane per 64 x 16 warp tile.
// The result is a 32-bit mask, bit 4*n + e for element (n, e) (the 64-column tiles have BN / 8 = 8 n-tiles).
//
// Dropout offset o (kHalo kernels only, p.drop_offset): query row i draws row id i + o, band key j key id j + o.
// As o % 4 == 0 and key tiles start at multiples of 64 in local numbering (halo tiles at negative ones too), key
// j + o sits in lane (j + o) & 3 = j & 3 of group (j + o) >> 2 = (j >> 2) + o / 4: the fragment's groups, lanes and
// shuffles are the ones without an offset (tests/test_cuda_halo.py emulates them against longattn._dropout).
#pragma once

#include "band_side/params.h"
#include "common/philox.h"

namespace longattn {

// Per-CTA dropout state: the counter base of this (b, h), read from the [seed, offset] device tensor.
struct DropoutCtx {
  philox::DropoutRng rng;
  uint32_t threshold;
  bool global_rows;  // rows are Longformer global rows (slot s): row word 0x80000000 | s
  int offset;        // ids of query rows and band keys = local index + offset (0: a compile-time 0, folded away)
};

// kOffset: read p.drop_offset (the kHalo kernels); the others use 0, so their code has no trace of it.
template <bool kOffset>
__device__ __forceinline__ DropoutCtx dropout_ctx(const BandSideParams& p, int b, int h) {
  return DropoutCtx{philox::dropout_rng(p.rng, (uint32_t)b * (uint32_t)p.H + (uint32_t)h), p.drop_threshold,
                    p.drop_global_rows, kOffset ? p.drop_offset : 0};
}

// Counter words of local query row i and band key / side key `key` (the offset moves rows and band keys only).
__device__ __forceinline__ uint32_t dropout_row_word(const DropoutCtx& c, int i) {
  return c.global_rows ? philox::global_row_word(i) : philox::row_word(i + c.offset);
}

__device__ __forceinline__ uint32_t dropout_group_word(const DropoutCtx& c, bool side, int key) {
  return side ? philox::side_group_word(key) : philox::band_group_word(key + c.offset);
}

// Rows = queries (forward, dQ): this lane's rows i0 (e < 2) and i1 = i0 + 8 (e >= 2), columns = keys
// key0 + frag_col (key0 a multiple of 4). Lanes 2u, 2u+1 hold keys 4q..4q+1 and 4q+2..4q+3 of one group for
// both rows: the even lane evaluates row i0's call, the odd lane row i1's, and they swap the two words the
// other needs (even gives z, w of row i0; odd gives x, y of row i1).
template <int N>
__device__ __forceinline__ uint32_t keep_mask_query_rows(const DropoutCtx& c, bool side, int key0, int i0, int i1,
                                                         int lane) {
  static_assert(N / 8 * 4 <= 32, "one bit per fragment element");
  const bool odd = lane & 1;
  const uint32_t row = dropout_row_word(c, odd ? i1 : i0);
  uint32_t mask = 0;
#pragma unroll
  for (int n = 0; n < N / 8; ++n) {
    const int key = key0 + n * 8 + (lane % 4) * 2;  // the lane pair's group: key >> 2 is the same for both
    const philox::Words4 w = philox::dropout_bits4(c.rng, dropout_group_word(c, side, key), row);
    const uint32_t r0 = __shfl_xor_sync(0xffffffffu, odd ? w.x : w.z, 1);
    const uint32_t r1 = __shfl_xor_sync(0xffffffffu, odd ? w.y : w.w, 1);
    const uint32_t e0 = odd ? r0 : w.x, e1 = odd ? r1 : w.y;  // row i0, columns 2t, 2t + 1
    const uint32_t e2 = odd ? w.z : r0, e3 = odd ? w.w : r1;  // row i1
    mask |= ((uint32_t)(e0 >= c.threshold) | (uint32_t)(e1 >= c.threshold) << 1 |
             (uint32_t)(e2 >= c.threshold) << 2 | (uint32_t)(e3 >= c.threshold) << 3)
            << (4 * n);
  }
  return mask;
}

// Rows = keys (dK/dV, the transposed products): this lane's keys k0 (e < 2) and k1 = k0 + 8 (e >= 2), columns
// = queries q0 + frag_col. The lanes L with the same L % 4 and (L / 4) / 4 (m = (L / 4) % 4 = k0 % 4) hold
// the 4 keys of k0's group and of k1's group at the same two queries: four Philox calls per n-tile, one per
// element index e = (k1 ? 2 : 0) + (query 2t + 1 ? 1 : 0), whose word m belongs to lane m. Lane m computes
// call e = m, then a 4 x 4 transpose over the xor partners m ^ 1, m ^ 2, m ^ 3 (lane bits 2-3) hands each
// lane word m of every call.
template <int N>
__device__ __forceinline__ uint32_t keep_mask_key_rows(const DropoutCtx& c, bool side, int k0, int q0, int lane) {
  static_assert(N / 8 * 4 <= 32, "one bit per fragment element");
  const int m = (lane / 4) % 4;
  const uint32_t group = dropout_group_word(c, side, (m >> 1) ? k0 + 8 : k0);
  uint32_t mask = 0;
#pragma unroll
  for (int n = 0; n < N / 8; ++n) {
    const int i = q0 + n * 8 + (lane % 4) * 2 + (m & 1);
    const philox::Words4 w = philox::dropout_bits4(c.rng, group, dropout_row_word(c, i));
    uint32_t bits = (uint32_t)(philox::lane_of(w, m) >= c.threshold) << m;
#pragma unroll
    for (int k = 1; k < 4; ++k) {
      // Send the partner (m ^ k) its word of this call; receive word m of the partner's call e = m ^ k.
      const uint32_t got = __shfl_xor_sync(0xffffffffu, philox::lane_of(w, m ^ k), 4 * k);
      bits |= (uint32_t)(got >= c.threshold) << (m ^ k);
    }
    mask |= bits << (4 * n);
  }
  return mask;
}

// The factor keep / (1 - p) of element (n, e).
__device__ __forceinline__ float keep_scale(uint32_t mask, int n, int e, float scale) {
  return (mask >> (4 * n + e)) & 1u ? scale : 0.f;
}

}  // namespace longattn
