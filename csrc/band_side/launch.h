// Host-side entry points of the band + side attention kernels (launch.cu), callable from the
// torch-facing API without it seeing any kernel template. Each returns the launch's cudaError_t.
#pragma once

#include <cuda_runtime.h>

#include "band_side/params.h"

namespace longattn {

// The delta launch's layout (bwd_kernel.h band_side_bwd_delta_rows, run by band_side_bwd_delta_kernel and Longformer's
// fused delta launch): kDeltaLanesPerRow lanes per (b, s, h) row, each reading 16-byte chunks of its dO and O, so a
// warp takes kDeltaRowsPerWarp rows, and kDeltaWarpsPerCta warps a CTA on a 1-D grid (at most 2^31 - 1 CTAs).
constexpr int kDeltaLanesPerRow = 8;
constexpr int kDeltaRowsPerWarp = 32 / kDeltaLanesPerRow;
constexpr int kDeltaWarpsPerCta = 8;
constexpr int64_t kDeltaRowsPerCta = int64_t(kDeltaRowsPerWarp) * kDeltaWarpsPerCta;
__host__ __device__ inline int64_t delta_warps(int64_t rows) {
  return (rows + kDeltaRowsPerWarp - 1) / kDeltaRowsPerWarp;
}

// Forward: fills p.out and p.lse (after converting 16-bit bias tables, p.band_bias_in / p.side_bias_in, into their
// float32 workspaces: a second launch only then).
cudaError_t run_band_side_fwd(const BandSideParams& p, bool bf16, cudaStream_t stream);
// Backward, step 1: p.delta = rowsum(dout * out); also converts 16-bit bias tables and zeroes the bias partials.
cudaError_t run_band_side_bwd_delta(const BandSideParams& p, bool bf16, cudaStream_t stream);
// Backward, step 2: p.dq.
cudaError_t run_band_side_bwd_dq(const BandSideParams& p, bool bf16, cudaStream_t stream);
// Backward, step 3: p.dk, p.dv, the side keys' gradients or their partials, and bias-gradient partials.
cudaError_t run_band_side_bwd_dkdv(const BandSideParams& p, bool bf16, cudaStream_t stream);
// Backward, step 4 (no launch unless finish_warps(p) has work): what the partials owe, summed in a fixed order: the
// side keys' dK/dV (into p.dside_k / p.dside_v, or added into rows p.side_index of p.dk, p.dv, or into
// p.dside_*_into) and the bias tables' gradients (p.dband_bias, p.dside_bias, in their dtypes).
cudaError_t run_band_side_bwd_finish(const BandSideParams& p, bool bf16, cudaStream_t stream);

}  // namespace longattn
