// Instantiates and launches the backward's dK/dV kernel (band key tiles, then side tiles x query chunks,
// in one grid).
#include "band_side/bwd_kernel.h"
#include "band_side/launch.h"
#include "band_side/launch_template.h"

namespace longattn {

cudaError_t run_band_side_bwd_dkdv(const BandSideParams& p, bool bf16, cudaStream_t stream) {
  return dispatch_traits(bf16, p.D, [&](auto traits) {
    using Traits = decltype(traits);
    const int band_ctas = p.n_band_tiles;  // ceil(S / 64), or with halo keys the tiles of their span
    const int side_ctas = ((p.G + Traits::kBlockN - 1) / Traits::kBlockN) * p.side_chunks;
    return dispatch_flags(p, [&]<bool kDropout, bool kRanges, bool kHalo, bool kIndexed, bool kQueryIndex>() {
      return launch_kernel(band_side_bwd_dkdv_kernel<Traits, kDropout, kRanges, kHalo, kIndexed, kQueryIndex>,
                           dim3(band_ctas + side_ctas, p.B, p.H), Traits::kThreads,
                           kRanges ? Traits::kBwdDkvRangesSmem : Traits::kBwdDkvSmem, p, stream);
    });
  });
}

}  // namespace longattn
