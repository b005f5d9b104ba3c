// Forward kernel of the band + side keys primitive (flash-attention 2 style).
//
// Grid (query tiles, B, H); one CTA owns 64 queries of one (b, h) (band_side_fwd_tile, the kernel's whole body, which
// Longformer's fused forward runs at its own tile coordinates: longformer/fused_fwd.h). walk_key_tiles feeds it one
// sequence of key tiles -- first the band tiles that intersect its queries' windows, then the side-key tiles --
// with the next tile's K and V arriving by cp.async while the current one is multiplied. Per tile:
// S = Q K^T on tensor cores, score_log2 (scale, bias, masks; range tests only on edge tiles), online
// softmax in registers, O += P V with P re-packed from the S accumulators. The row log-sum-exp is written
// for the backward pass; nothing of size S x keys ever reaches global memory.
//
// kDropout: P (unnormalised, after its contribution to the row sum) is multiplied by keep / (1 - p) before the
// P V product, so out = (P Z) V / l with the undropped normaliser l; the lse is the undropped one.
//
// kRanges (per-row key ranges, band_side/ranges.h): the walk covers only the key tiles meeting the tile's rows'
// ranges, and on a range's edge tiles the scores outside a row's range become -inf.
//
// kHalo (halo keys, never with kRanges): the band walk covers the keys [-halo_left, S + halo_right); the tiles
// reaching outside [0, S) read those rows from halo_k / halo_v in place and test each element (window, extent,
// halo_mask), the others are the plain kernel's tiles. With kDropout the keep bits of query i and band key j (halo
// keys at their local j < 0 or >= S) are those of row i + drop_offset, key j + drop_offset (dropout.h).
//
// kIndexed (Longformer's band pass, never with kHalo): side key g is token side_index[b, g] of k / v, read in place
// (load_side_kv_async); in the epilogue rows outside query_mask get out = 0 and, with band_rows_only, rows outside
// band_key_mask lse = +inf (so the backward gives them nothing). With kRanges (a packed batch's band pass) the walk and
// the masks are the kRanges kernels': side_ranges index the slots g, key_ranges the band keys, as without kIndexed.
//
// side_only (Longformer's global rows: the slot queries against a key split as side keys): the walk has no band
// tile (a runtime flag read once per CTA by the kRanges kernels' walk, which dispatch_flags runs for it).
//
// kQueryIndex (Longformer's global rows read in place; with side_only, so only with kRanges): query row i of batch row
// b is token query_index[b / query_split, i] of q (load_query_tile_async): every key split reads the slots' rows of
// the unsplit q, no copy of them per split. Rows whose token is outside [0, query_tokens) read zeros and get out = 0,
// lse = +inf (mask_unindexed_rows).
#pragma once

#include "band_side/dropout.h"
#include "band_side/ranges.h"
#include "band_side/tile_ops.h"

namespace longattn {

// kIndexed epilogue: out = 0 (inv = 0) for rows outside query_mask, lse = +inf for rows outside band_key_mask with
// band_rows_only (the Longformer op's padding and global rows). Rows >= S are never stored.
__device__ __forceinline__ void longformer_row_masks(const BandSideParams& p, int b, int i0, int i1, float (&inv)[2],
                                                     float (&lse)[2]) {
  const int rows[2] = {i0, i1};
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (rows[r] >= p.S) continue;
    const int64_t at = (int64_t)b * p.S + rows[r];
    if (p.query_mask != nullptr && !p.query_mask[at]) inv[r] = 0.f;
    if (p.band_rows_only && p.band_key_mask != nullptr && !p.band_key_mask[at]) lse[r] = INFINITY;
  }
}

// kQueryIndex epilogue (Longformer's global rows read in place): rows whose token is outside [0, query_tokens) read
// zeros; they get out = 0 (inv = 0) and lse = +inf, as rows with no key. Rows >= S are never stored.
__device__ __forceinline__ void mask_unindexed_rows(const BandSideParams& p, int b, int i0, int i1, float (&inv)[2],
                                                    float (&lse)[2]) {
  const int64_t* index = p.query_index + (int64_t)(b / p.query_split) * p.query_index_stride;
  const int rows[2] = {i0, i1};
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (rows[r] >= p.S) continue;
    const int64_t token = __ldg(index + rows[r]);
    if (token < 0 || token >= p.query_tokens) {
      inv[r] = 0.f;
      lse[r] = INFINITY;
    }
  }
}

// kIndexed with Longformer's fused forward (kSlotRowsElsewhere, longformer/fused_fwd.h): whether row i holds a used
// slot's token, whose out row the global rows' merge writes in the same launch (so the band pass must not). That is a
// global row (real, not a band row) among the first G globals of its batch row: the slot layout (global_slots) puts the
// globals first, in sequence order, so every global when slot G - 1 is unused (fewer than G globals), else those up
// to pos[b, G - 1]. p.side_mask is then the slots' used flags, contiguous (B, G), and p.side_index their positions.
__device__ __forceinline__ bool is_used_slot_row(const BandSideParams& p, int b, int i) {
  const int64_t at = (int64_t)b * p.S + i;
  if (p.G == 0 || p.band_key_mask == nullptr || p.band_key_mask[at] || (p.query_mask != nullptr && !p.query_mask[at]))
    return false;
  const int last = p.G - 1;
  if (p.side_mask != nullptr && !p.side_mask[(int64_t)b * p.G + last]) return true;
  return i <= __ldg(p.side_index + (int64_t)b * p.side_index_stride + last);
}

// The forward of one query tile: rows [m0, m0 + 64) of batch row b, head h, in the dynamic shared memory `smem_raw`
// (Traits::kFwdSmem bytes). The whole body of band_side_fwd_kernel, and shared with Longformer's fused forward
// (longformer/fused_fwd.h), whose CTAs run it for one of two params at their own tile coordinates.
// kSlotRowsElsewhere (only with kIndexed): rows holding a used slot's token are not stored (is_used_slot_row).
template <typename Traits, bool kDropout, bool kRanges, bool kHalo, bool kIndexed, bool kQueryIndex,
          bool kSlotRowsElsewhere = false>
__device__ __forceinline__ void band_side_fwd_tile(const BandSideParams& p, int m0, int b, int h,
                                                   unsigned char* smem_raw) {
  static_assert(!(kHalo && kRanges), "halo keys come without ranges");
  static_assert(!(kIndexed && kHalo), "indexed side keys come without halo keys");
  static_assert(!kQueryIndex || (kRanges && !kIndexed), "indexed query rows: side_only, run by the kRanges walk");
  static_assert(!kSlotRowsElsewhere || kIndexed, "slot rows are Longformer's band pass's");
  using T = typename Traits::Element;
  constexpr int D = Traits::kHeadDim, BN = Traits::kBlockN, LDS = Traits::kSmemStride;
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + Traits::kTileElems;      // 2 buffers
  T* sV = sK + 2 * Traits::kTileElems;  // 2 buffers

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;

  load_query_tile_async<Traits, kQueryIndex>(sQ, p, p.q, p.q_st, b, h, m0, tid);  // joins the first K/V group

  // This thread's two query rows (fragment rows lane/4 and lane/4 + 8 of the warp's 16).
  const int i0 = m0 + warp * 16 + lane / 4, i1 = i0 + 8;
  const int qb0 = clamp_query_block(p, b, i0), qb1 = clamp_query_block(p, b, i1);

  float acc_o[D / 8][4];
  zero(acc_o);
  float row_max[2] = {-INFINITY, -INFINITY};  // log2 units
  float row_sum[2] = {0.f, 0.f};              // this thread's partial; quad-reduced at the end
  DropoutCtx drop{};
  if constexpr (kDropout) drop = dropout_ctx<kHalo>(p, b, h);
  QueryRanges ranges{};
  const KeyTileWalk walk = query_tile_walk<Traits, kRanges, kHalo>(p, b, m0, i0, i1, ranges);

  walk_key_tiles<Traits, kRanges, kHalo, kIndexed>(p, walk, m0, sK, sV, b, h, tid, [&](const KeyTile& kt, const T* sKt,
                                                                              const T* sVt) {
    // The keep bits depend on indices only: drawn before the product, while few registers are live.
    uint32_t keep = 0;
    if constexpr (kDropout) keep = keep_mask_query_rows<BN>(drop, kt.side, kt.key0, i0, i1, lane);
    uint32_t in_range = ~0u;
    if constexpr (kRanges) in_range = ranges.tile_mask<BN>(p, kt.side, kt.key0, b, i0, i1, lane);
    float s[BN / 8][4];
    zero(s);
    gemm_nt<T, D, BN, LDS>(s, sQ + warp * 16 * LDS, sKt, lane);

    float tile_max[2] = {-INFINITY, -INFINITY};
    const uint64_t key_bits = column_key_bits(p, kt, b, lane);
#pragma unroll
    for (int n = 0; n < BN / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        s[n][e] = score_log2<kHalo>(p, kt, column_key_kept(key_bits, n, e), s[n][e], r ? i1 : i0,
                                    kt.key0 + frag_col(lane, n, e), b, h, r ? qb1 : qb0);
        if constexpr (kRanges) {
          if (!mask_bit(in_range, n, e)) s[n][e] = -INFINITY;
        }
        tile_max[r] = fmaxf(tile_max[r], s[n][e]);
      }
    }
    float alpha[2], base[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      // The 4 lanes of a quad share a row.
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
      const float new_max = fmaxf(row_max[r], tile_max[r]);
      // A row with no key yet keeps max -inf; subtract 0 instead so exp2 gives 0, not NaN.
      base[r] = new_max == -INFINITY ? 0.f : new_max;
      alpha[r] = exp2f(row_max[r] - base[r]);
      row_max[r] = new_max;
      row_sum[r] *= alpha[r];
    }
#pragma unroll
    for (int n = 0; n < BN / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[n][e] = exp2f(s[n][e] - base[e >> 1]);
        row_sum[e >> 1] += s[n][e];
      }
    }
    if constexpr (kDropout) {
#pragma unroll
      for (int n = 0; n < BN / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) s[n][e] *= keep_scale(keep, n, e, p.drop_scale);
      }
    }
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      acc_o[n][0] *= alpha[0];
      acc_o[n][1] *= alpha[0];
      acc_o[n][2] *= alpha[1];
      acc_o[n][3] *= alpha[1];
    }
    uint32_t pa[BN / 16][4];
    acc_to_a<T, BN>(s, pa);
    gemm_rs<T, BN, D, LDS>(acc_o, pa, sVt, lane);
  });

  // Epilogue: normalise, write out and the natural-log lse (+inf and a zero row when nothing was seen).
  float inv[2], lse[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = row_sum[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const bool empty = !(l > 0.f);
    inv[r] = empty ? 0.f : 1.f / l;
    // Rounding pinned (__fmul_rn / __fadd_rn are never contracted into an FFMA): this body is inlined into several
    // kernels (band_side_fwd_kernel's instantiations, Longformer's fused forward), and ptxas contracted the
    // `row_max * ln2 + ln2 * log2(l)` of logf differently in each, which broke the fused forward's bitwise
    // equality with the composed path in ~1 % of the lse values.
    lse[r] = empty ? INFINITY : __fadd_rn(__fmul_rn(row_max[r], kLn2), __fmul_rn(__log2f(l), kLn2));
  }
  if constexpr (kIndexed) longformer_row_masks(p, b, i0, i1, inv, lse);
  if constexpr (kQueryIndex) mask_unindexed_rows(p, b, i0, i1, inv, lse);
  T* out = reinterpret_cast<T*>(p.out) + ((int64_t)b * p.S * p.H + h) * D;
  if constexpr (kSlotRowsElsewhere) {
    const int rows[2] = {i0, i1};
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (rows[r] < p.S && !is_used_slot_row(p, b, rows[r]))
        store_frag_row<T, D>(acc_o, r, out + (int64_t)rows[r] * p.H * D, lane, inv[r]);
    }
  } else {
    store_rows<T, D>(acc_o, out, (int64_t)p.H * D, m0 + warp * 16, p.S, lane, inv[0], inv[1]);
  }
  if (lane % 4 == 0) {
    float* lse_row = p.lse + ((int64_t)b * p.H + h) * p.S;
    if (i0 < p.S) lse_row[i0] = lse[0];
    if (i1 < p.S) lse_row[i1] = lse[1];
  }
}

template <typename Traits, bool kDropout, bool kRanges, bool kHalo, bool kIndexed, bool kQueryIndex>
__global__ void __launch_bounds__(Traits::kThreads) band_side_fwd_kernel(const BandSideParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  band_side_fwd_tile<Traits, kDropout, kRanges, kHalo, kIndexed, kQueryIndex>(p, blockIdx.x * Traits::kBlockM,
                                                                               blockIdx.y, blockIdx.z, smem_raw);
}

}  // namespace longattn
