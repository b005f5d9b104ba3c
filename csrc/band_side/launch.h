// Host-side entry points of the band + side attention kernels (launch.cu), callable from the
// torch-facing API without it seeing any kernel template. Each returns the launch's cudaError_t.
#pragma once

#include <cuda_runtime.h>

#include "band_side/params.h"

namespace longattn {

// Forward: fills p.out and p.lse.
cudaError_t run_band_side_fwd(const BandSideParams& p, bool bf16, cudaStream_t stream);
// Backward, step 1: p.delta = rowsum(dout * out).
cudaError_t run_band_side_bwd_delta(const BandSideParams& p, bool bf16, cudaStream_t stream);
// Backward, step 2: p.dq.
cudaError_t run_band_side_bwd_dq(const BandSideParams& p, bool bf16, cudaStream_t stream);
// Backward, step 3: p.dk, p.dv, side-key partials and bias-gradient partials.
cudaError_t run_band_side_bwd_dkdv(const BandSideParams& p, bool bf16, cudaStream_t stream);
// Backward, step 4 (p.side_index or p.dside_k_into only): the side-key partials summed and added into the keys' rows
// (rows p.side_index of p.dk, p.dv, or the key splits' rows of p.dside_k_into, p.dside_v_into).
cudaError_t run_band_side_bwd_side_add(const BandSideParams& p, bool bf16, cudaStream_t stream);

}  // namespace longattn
