// Longformer's fused backward's dQ kernel (fused_bwd.h), instantiated per (dtype, head dim) in
// instantiations/bwd_dq_*.cu: one grid of the global rows' split dQ CTAs, then the band pass's query tiles, each
// band_side_bwd_dq_tile (band_side/bwd_kernel.h) at its own coordinates, so the band_side kernels' code is unchanged.
// Registers: the max of the two tile bodies; smem: Traits::kBwdDqSmem for both.
#pragma once

#include "band_side/bwd_kernel.h"
#include "band_side/launch_template.h"
#include "longformer/fused_bwd.h"

namespace longattn {

template <typename Traits, bool kRanges>
__global__ void __launch_bounds__(Traits::kThreads) longformer_bwd_dq_kernel(const LongformerBwdParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  constexpr int BM = Traits::kBlockM;
  int x = blockIdx.x;
  if (x < p.n_lead) {  // CTA-uniform: a global rows' split CTA (side_only, read in place at pos)
    const int tile = x % p.n_slot_tiles;
    x /= p.n_slot_tiles;
    band_side_bwd_dq_tile<Traits, false, true, false, false, true>(p.rows, tile * BM, x % p.rows.B, x / p.rows.B,
                                                                   smem_raw);
  } else {
    x -= p.n_lead;
    const int tile = x % p.n_query_tiles;
    x /= p.n_query_tiles;
    band_side_bwd_dq_tile<Traits, false, kRanges, false, true, false>(p.band, tile * BM, x % p.band.B, x / p.band.B,
                                                                      smem_raw);
  }
}

template <typename Traits>
cudaError_t launch_longformer_bwd_dq(const LongformerBwdParams& p, cudaStream_t stream) {
  const int64_t ctas = p.n_lead + (int64_t)p.n_query_tiles * p.band.B * p.band.H;
  if (ctas == 0) return cudaSuccess;
  const bool ranges = p.band.key_ranges != nullptr || p.band.side_ranges != nullptr;
  return ranges ? launch_kernel(longformer_bwd_dq_kernel<Traits, true>, dim3((unsigned)ctas), Traits::kThreads,
                                Traits::kBwdDqSmem, p, stream)
                : launch_kernel(longformer_bwd_dq_kernel<Traits, false>, dim3((unsigned)ctas), Traits::kThreads,
                                Traits::kBwdDqSmem, p, stream);
}

}  // namespace longattn

// The explicit instantiation of the dQ launch for one (dtype, head dim): the whole body of an instantiation file.
#define LONGATTN_INSTANTIATE_LONGFORMER_BWD_DQ(Element, kHeadDim)                                                  \
  template cudaError_t longattn::launch_longformer_bwd_dq<longattn::BandSideTraits<Element, kHeadDim>>(          \
      const longattn::LongformerBwdParams&, cudaStream_t);
