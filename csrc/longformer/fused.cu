// Longformer's fused forward: the (dtype, head dim) dispatch to the instantiation files (fused.h).
#include "band_side/launch_template.h"
#include "longformer/fused.h"

namespace longattn {

cudaError_t run_longformer_fwd(const LongformerFwdParams& p, bool bf16, cudaStream_t stream) {
  return dispatch_traits(bf16, p.band.D,
                         [&](auto traits) { return launch_longformer_fwd<decltype(traits)>(p, stream); });
}

}  // namespace longattn
