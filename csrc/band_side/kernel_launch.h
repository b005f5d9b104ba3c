// The band + side tile kernels' launches for one (dtype, head dim), each over the flags of dispatch_flags. Only the
// instantiation files (instantiations/*.cu, one kernel and (dtype, head dim) each) include this: a parallel build then
// compiles the 3 kernels x 6 (dtype, head dim) families at once, not one launch file's 72 kernels after another.
#pragma once

#include "band_side/bwd_kernel.h"
#include "band_side/fwd_kernel.h"
#include "band_side/launch_template.h"

namespace longattn {

template <typename Traits>
cudaError_t launch_band_side_fwd(const BandSideParams& p, cudaStream_t stream) {
  return dispatch_flags(p, [&]<bool kDropout, bool kRanges, bool kHalo, bool kIndexed, bool kQueryIndex>() {
    return launch_kernel(band_side_fwd_kernel<Traits, kDropout, kRanges, kHalo, kIndexed, kQueryIndex>,
                         query_tile_grid<Traits>(p), Traits::kThreads, Traits::kFwdSmem, p, stream);
  });
}

template <typename Traits>
cudaError_t launch_band_side_bwd_dq(const BandSideParams& p, cudaStream_t stream) {
  return dispatch_flags(p, [&]<bool kDropout, bool kRanges, bool kHalo, bool kIndexed, bool kQueryIndex>() {
    return launch_kernel(band_side_bwd_dq_kernel<Traits, kDropout, kRanges, kHalo, kIndexed, kQueryIndex>,
                         query_tile_grid<Traits>(p), Traits::kThreads, Traits::kBwdDqSmem, p, stream);
  });
}

// One grid: the band key tiles, then the side key tiles x query chunks.
template <typename Traits>
cudaError_t launch_band_side_bwd_dkdv(const BandSideParams& p, cudaStream_t stream) {
  const int band_ctas = p.n_band_tiles;  // ceil(S / 64), or with halo keys the tiles of their span
  const int side_ctas = ((p.G + Traits::kBlockN - 1) / Traits::kBlockN) * p.side_chunks;
  return dispatch_flags(p, [&]<bool kDropout, bool kRanges, bool kHalo, bool kIndexed, bool kQueryIndex>() {
    return launch_kernel(band_side_bwd_dkdv_kernel<Traits, kDropout, kRanges, kHalo, kIndexed, kQueryIndex>,
                         dim3(band_ctas + side_ctas, p.B, p.H), Traits::kThreads,
                         kRanges ? Traits::kBwdDkvRangesSmem : Traits::kBwdDkvSmem, p, stream);
  });
}

}  // namespace longattn

// The explicit instantiation of one launch for one (dtype, head dim): the whole body of an instantiation file.
#define LONGATTN_INSTANTIATE_BAND_SIDE(launch, Element, kHeadDim)                                                  \
  template cudaError_t longattn::launch<longattn::BandSideTraits<Element, kHeadDim>>(const longattn::BandSideParams&, \
                                                                                     cudaStream_t);
