// Instantiates and launches the forward kernel for fp16/bf16 x head dims 32/64/128 (x the flags of dispatch_flags).
#include "band_side/fwd_kernel.h"
#include "band_side/launch.h"
#include "band_side/launch_template.h"

namespace longattn {

cudaError_t run_band_side_fwd(const BandSideParams& p, bool bf16, cudaStream_t stream) {
  return dispatch_traits(bf16, p.D, [&](auto traits) {
    using Traits = decltype(traits);
    return dispatch_flags(p, [&]<bool kDropout, bool kRanges, bool kHalo, bool kIndexed, bool kQueryIndex>() {
      return launch_kernel(band_side_fwd_kernel<Traits, kDropout, kRanges, kHalo, kIndexed, kQueryIndex>,
                           query_tile_grid<Traits>(p), Traits::kThreads, Traits::kFwdSmem, p, stream);
    });
  });
}

}  // namespace longattn
