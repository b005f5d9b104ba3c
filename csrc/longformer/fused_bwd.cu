// Longformer's fused backward (fused_bwd.h): the 4 launches in stream order; the delta kernel is compiled here
// (running the band_side kernels' body, band_side/bwd_kernel.h), the dQ kernel and launch 4 per (dtype, head dim) in
// instantiations/bwd_dq_*.cu and bwd_rows_*.cu; the band dK/dV launch is the band_side one.
#include "band_side/bwd_kernel.h"
#include "band_side/launch.h"
#include "band_side/launch_template.h"
#include "longformer/fused_bwd.h"

namespace longattn {
namespace {

// The leading delta_warps(B * S * H) warps take the band pass's rows, the next delta_warps(B * C * G * H) the global
// rows' (band_side_bwd_delta_rows; kDeltaWarpsPerCta warps a CTA). Also zeroes dq_global (p.zero, grid-stride), which
// launch 4 then adds into.
template <typename T>
__global__ void longformer_bwd_delta_kernel(const LongformerBwdParams p) {
  if (p.zero != nullptr) grid_zero_fill(p.zero, p.zero_count);
  const int64_t w = (int64_t)blockIdx.x * kDeltaWarpsPerCta + threadIdx.x / 32;
  const int64_t band_warps = delta_warps((int64_t)p.band.B * p.band.S * p.band.H);
  if (w < band_warps) {  // warp-uniform
    band_side_bwd_delta_rows<T, false>(p.band, w);
  } else {
    band_side_bwd_delta_rows<T, true>(p.rows, w - band_warps);
  }
}

template <typename T>
cudaError_t run_delta(const LongformerBwdParams& p, cudaStream_t stream) {
  const int64_t warps =
      delta_warps((int64_t)p.band.B * p.band.S * p.band.H) + delta_warps((int64_t)p.rows.B * p.rows.S * p.rows.H);
  const int64_t ctas = (warps + kDeltaWarpsPerCta - 1) / kDeltaWarpsPerCta;
  if (ctas == 0) return cudaSuccess;
  longformer_bwd_delta_kernel<T><<<dim3((unsigned)ctas), kDeltaWarpsPerCta * 32, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t run_longformer_bwd(LongformerBwdParams p, bool bf16, cudaStream_t stream) {
  // Launch 4: with shared k / v (the global rows' dK/dV added into the band pass's dk / dv) the side keys' finish warps
  // are left to the key rows' owners (fused_bwd_rows.h finish_owned_key_rows).
  const FinishWarps jobs = finish_warps(p.band);
  p.first_finish_warp = p.rows.dside_k_into != nullptr ? jobs.side_keys : 0;
  const RowsLaunch last = rows_launch(jobs.total() - p.first_finish_warp,
                                      (int64_t)p.add.B * p.add.G * p.add.H * p.add.D, p.rows.B, p.rows.G, p.rows.H);
  p.n_finish_ctas = last.finish_ctas;
  p.n_add_ctas = last.add_ctas;
  p.n_key_tiles = static_cast<int>(last.key_tiles);
  p.n_lead_x = last.lead_x;
  cudaError_t err = bf16 ? run_delta<__nv_bfloat16>(p, stream) : run_delta<__half>(p, stream);
  if (err == cudaSuccess)
    err = dispatch_traits(bf16, p.band.D,
                          [&](auto traits) { return launch_longformer_bwd_dq<decltype(traits)>(p, stream); });
  if (err == cudaSuccess) err = run_band_side_bwd_dkdv(p.band, bf16, stream);
  if (err == cudaSuccess)
    err = dispatch_traits(bf16, p.band.D,
                          [&](auto traits) { return launch_longformer_bwd_rows<decltype(traits)>(p, stream); });
  return err;
}

}  // namespace longattn
