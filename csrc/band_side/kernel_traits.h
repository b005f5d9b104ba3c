// Compile-time shape of the band + side attention kernels.
//
// One CTA = 4 warps = 128 threads working on a 64 x 64 (queries x keys) score tile; each warp owns 16
// rows of it (16 queries in the forward and dQ kernels, 16 keys in the dK/dV kernel), so every softmax
// row lives in one warp and no cross-warp reduction is needed. The template parameters are the element
// type and the head dim (2 x 3), and on each kernel the flags kDropout, kRanges, kHalo, kIndexed (Longformer's
// indexed side keys) and kQueryIndex (Longformer's indexed query rows) (so the instantiation without dropout, per-row
// key ranges, halo keys and indices is exactly the code without them; see dispatch_flags for the combinations that
// exist) -- everything else (masks, biases, side keys, edge tiles, the lse gradient) is a runtime flag, which keeps
// the build to a few minutes.
#pragma once

#include "common/ptx.h"

namespace longattn {

template <typename Element_, int kHeadDim_>
struct BandSideTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = 64;  // queries per tile
  static constexpr int kBlockN = 64;  // keys per tile
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static_assert(kBlockM == kWarps * 16 && kBlockN == kWarps * 16, "one warp owns 16 rows");
  static_assert(kHeadDim % 16 == 0, "mma k-steps of 16");
  static_assert(kBlockN == 64, "tile_key_bits (tile_ops.h) holds one bit per key of a tile in a uint64_t");
  // Shared-memory rows are padded by 8 elements (16 bytes): consecutive rows then start in different
  // 16-byte bank groups, so the 8 row addresses of one ldmatrix hit 8 distinct groups (conflict-free)
  // for D = 32, 64 and 128 alike. Cheaper to reason about than an XOR swizzle at these sizes.
  static constexpr int kSmemStride = kHeadDim + 8;
  static constexpr int kTileElems = kBlockM * kSmemStride;  // one 64-row tile (kBlockM == kBlockN)
  static constexpr int kTileBytes = kTileElems * (int)sizeof(Element);
  // 16-byte chunks of one row and per thread for a whole tile.
  static constexpr int kRowChunks = kHeadDim / 8;
  static constexpr int kChunksPerThread = kBlockM * kRowChunks / kThreads;
  static_assert(kBlockM * kRowChunks % kThreads == 0, "tile loads split evenly");

  // Forward: Q + double-buffered K and V.
  static constexpr int kFwdSmem = 5 * kTileBytes;
  // dQ: Q, dO + double-buffered K and V.
  static constexpr int kBwdDqSmem = 6 * kTileBytes;
  // dK/dV: K, V + double-buffered Q and dO, per-query lse/delta/query_block (x2 buffers), and a float
  // dS tile for the deterministic bias-gradient reduction (stride kBlockM + 1 against bank conflicts).
  static constexpr int kDsStride = kBlockM + 1;
  static constexpr int kBwdDkvSmem = 6 * kTileBytes + 2 * 3 * kBlockM * 4 + kBlockN * kDsStride * 4;
  // With per-row key ranges, after those: the query rows' ranges (lo, hi x 2 buffers) and 2 x 2 tile flags.
  static constexpr int kBwdDkvRangesSmem = kBwdDkvSmem + (2 * 2 * kBlockM + 4) * 4;
};

}  // namespace longattn
