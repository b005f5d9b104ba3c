// The band + side kernels' host entry points (launch.h): the (dtype, head dim) dispatch to the tile kernels'
// instantiation files, the forward's bias-table conversion and the backward's two small kernels (delta, finish),
// launched here.
#include "band_side/bwd_kernel.h"
#include "band_side/launch.h"
#include "band_side/launch_template.h"

namespace longattn {

// The forward's conversion of 16-bit bias tables (bias_tables.h): one thread an entry of both tables.
__global__ void band_side_bias_convert_kernel(const BandSideParams p) { convert_bias_tables(p); }

cudaError_t run_band_side_fwd(const BandSideParams& p, bool bf16, cudaStream_t stream) {
  if (const int64_t n = bias_convert_count(p); n > 0) {  // a 16-bit table: convert it first (stream order)
    constexpr int kThreads = 256;
    band_side_bias_convert_kernel<<<(unsigned)((n + kThreads - 1) / kThreads), kThreads, 0, stream>>>(p);
    if (const cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  }
  return dispatch_traits(bf16, p.D, [&](auto traits) { return launch_band_side_fwd<decltype(traits)>(p, stream); });
}

cudaError_t run_band_side_bwd_dq(const BandSideParams& p, bool bf16, cudaStream_t stream) {
  return dispatch_traits(bf16, p.D, [&](auto traits) { return launch_band_side_bwd_dq<decltype(traits)>(p, stream); });
}

cudaError_t run_band_side_bwd_dkdv(const BandSideParams& p, bool bf16, cudaStream_t stream) {
  return dispatch_traits(bf16, p.D,
                         [&](auto traits) { return launch_band_side_bwd_dkdv<decltype(traits)>(p, stream); });
}

cudaError_t run_band_side_bwd_delta(const BandSideParams& p, bool bf16, cudaStream_t stream) {
  const int64_t warps = delta_warps((int64_t)p.B * p.S * p.H);  // kDeltaRowsPerWarp rows a warp
  const dim3 grid((unsigned)((warps + kDeltaWarpsPerCta - 1) / kDeltaWarpsPerCta));
  // Longformer's global rows read dO / O in place at the slots' tokens (query_index): their own instantiation.
  const auto kernel = bf16 ? (p.query_index != nullptr ? band_side_bwd_delta_kernel<__nv_bfloat16, true>
                                                       : band_side_bwd_delta_kernel<__nv_bfloat16, false>)
                           : (p.query_index != nullptr ? band_side_bwd_delta_kernel<__half, true>
                                                       : band_side_bwd_delta_kernel<__half, false>);
  kernel<<<grid, kDeltaWarpsPerCta * 32, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t run_band_side_bwd_finish(const BandSideParams& p, bool bf16, cudaStream_t stream) {
  constexpr int kWarps = 8;  // one job per warp (finish_warps)
  const int64_t warps = finish_warps(p).total();
  if (warps == 0) return cudaSuccess;
  const dim3 grid((unsigned)((warps + kWarps - 1) / kWarps));
  if (bf16) {
    band_side_bwd_finish_kernel<__nv_bfloat16><<<grid, kWarps * 32, 0, stream>>>(p);
  } else {
    band_side_bwd_finish_kernel<__half><<<grid, kWarps * 32, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace longattn
