// Longformer's fused forward kernel (fused.h): one launch whose leading CTAs are the global rows' split-KV CTAs
// (flash-decoding: each slot tile against one key split) and whose other CTAs are the band pass, both running
// band_side_fwd_tile (band_side/fwd_kernel.h) on their own params. The last split CTA of a slot tile to arrive merges
// the C splits (merge_when_last): no merge launch, and no CTA ever waits for another, so any schedule completes.
//
// Bitwise the composed path's result (band op, split band op, rows_merge_kernel): the same tile code per CTA, and the
// same merge_elements arithmetic, the splits in split order, whichever CTA arrives last. The band CTAs store no row
// that holds a used slot's token (kSlotRowsElsewhere): the merge writes those rows in the same launch, so each row of
// out has one writer.
//
// Dropout is not fused (the Python side runs the composed path for it); the band pass with per-row key ranges
// (a packed batch) is the kRanges instantiation, the global rows are always the kRanges walk (side_only, query_index).
// Registers: the max of the two tile bodies (one kernel, two branches); smem: Traits::kFwdSmem for both, plus one int.
// sm_90 (ptxas, CUDA 13.0), without / with the band pass's ranges: D = 64: 150 / 146 registers, D = 128: 180 / 178,
// D = 32: 128 (32 B spilled) / 125; the band pass's own kernels (kIndexed / with kRanges): 134 / 168, 168 / 195,
// 106 / 128, and the global rows' (kQueryIndex): 138, 174, 128. Not measured on a GPU yet.
// Cost (a prediction): the split and band CTAs are the composed path's two launches' CTAs; the merge moves from a
// launch of B * G * ceil(H * D / 128) CTAs into one CTA per (b, h, slot tile), reading 64 * D * C partials with
// 16-byte L2 loads: about 80 dependent L2 round trips a thread (30-40 us) for 64 globals at D = 64 and C = 16 splits,
// in one CTA while the band CTAs run; a few for one global.
#pragma once

#include "band_side/fwd_kernel.h"
#include "band_side/launch_template.h"
#include "longformer/fused.h"
#include "longformer/merge.h"

namespace longattn {

// After a split CTA's tile (slot tile `tile`, split batch row bc, head h): the last of the slot tile's C split CTAs to
// arrive merges all of them into out and glse. Release: every thread fences its partial stores before the barrier that
// precedes the counter's increment; acquire: the incrementing thread fences after it, before the barrier that precedes
// the merge, whose loads of the partials go to L2 (merge_elements' ld.global.cg). The last arriver also resets the
// counter, so counters that were zero before a launch are zero after it.
template <typename Traits>
__device__ __forceinline__ void merge_when_last(const LongformerFwdParams& p, int tile, int bc, int h) {
  constexpr int D = Traits::kHeadDim, BM = Traits::kBlockM;
  using T = typename Traits::Element;
  __shared__ int last;
  const RowsParams& m = p.merge;
  const int b = bc / m.C;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    int32_t* counter = p.counter + ((int64_t)b * m.H + h) * p.n_slot_tiles + tile;
    const int arrived = atomicAdd(counter, 1);
    __threadfence();
    last = arrived == m.C - 1;
    if (last) *counter = 0;  // every split has arrived: back to zero for the next launch (a replay needs no zeroing)
  }
  __syncthreads();
  if (!last) return;  // CTA-uniform
  // 16 bytes of a slot row per thread (kPerRow threads a row): each thread keeps elements d0 .. d0 + V - 1 of the head
  // and walks the tile's slots kThreads / kPerRow apart (fewer, wider L2 loads than one element a thread).
  constexpr int V = 16 / sizeof(T), kPerRow = D / V;
  static_assert(D % V == 0 && Traits::kThreads % kPerRow == 0, "whole 16-byte words, whole slot rows per pass");
  const int g0 = tile * BM, n = min(BM, m.G - g0), d0 = threadIdx.x % kPerRow * V;
  for (int r = threadIdx.x / kPerRow; r < n; r += Traits::kThreads / kPerRow)
    merge_elements<T, V>(m, slot_at(m, b, g0 + r), h, d0);
}

template <typename Traits, bool kRanges>
__global__ void __launch_bounds__(Traits::kThreads) longformer_fwd_kernel(const LongformerFwdParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  constexpr int BM = Traits::kBlockM;
  int x = blockIdx.x;
  if (x < p.n_lead) {  // CTA-uniform: a global rows' split CTA
    const int tile = x % p.n_slot_tiles;
    x /= p.n_slot_tiles;
    const int bc = x % p.rows.B, h = x / p.rows.B;
    band_side_fwd_tile<Traits, false, true, false, false, true>(p.rows, tile * BM, bc, h, smem_raw);
    merge_when_last<Traits>(p, tile, bc, h);
  } else {
    x -= p.n_lead;
    const int tile = x % p.n_query_tiles;
    x /= p.n_query_tiles;
    band_side_fwd_tile<Traits, false, kRanges, false, true, false, true>(p.band, tile * BM, x % p.band.B, x / p.band.B,
                                                                         smem_raw);
  }
}

template <typename Traits>
cudaError_t launch_longformer_fwd(const LongformerFwdParams& p, cudaStream_t stream) {
  const int64_t ctas = p.n_lead + (int64_t)p.n_query_tiles * p.band.B * p.band.H;
  if (ctas == 0) return cudaSuccess;
  const bool ranges = p.band.key_ranges != nullptr || p.band.side_ranges != nullptr;
  return ranges ? launch_kernel(longformer_fwd_kernel<Traits, true>, dim3((unsigned)ctas), Traits::kThreads,
                                Traits::kFwdSmem, p, stream)
                : launch_kernel(longformer_fwd_kernel<Traits, false>, dim3((unsigned)ctas), Traits::kThreads,
                                Traits::kFwdSmem, p, stream);
}

}  // namespace longattn

// The explicit instantiation of the launch for one (dtype, head dim): the whole body of an instantiation file.
#define LONGATTN_INSTANTIATE_LONGFORMER_FWD(Element, kHeadDim)                                                     \
  template cudaError_t longattn::launch_longformer_fwd<longattn::BandSideTraits<Element, kHeadDim>>(             \
      const longattn::LongformerFwdParams&, cudaStream_t);
