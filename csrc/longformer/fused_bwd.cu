// Longformer's fused backward (fused_bwd.h): the 5 launches in stream order; the delta and finish kernels are compiled
// here (each running the band_side kernels' bodies, band_side/bwd_kernel.h), the dQ kernel per (dtype, head dim) in
// instantiations/bwd_dq_*.cu; the dK/dV launches are the band_side ones.
#include "band_side/bwd_kernel.h"
#include "band_side/launch.h"
#include "band_side/launch_template.h"
#include "longformer/fused_bwd.h"
#include "longformer/merge.h"

namespace longattn {
namespace {

// The leading delta_warps(B * S * H) warps take the band pass's rows, the next delta_warps(B * C * G * H) the global
// rows' (band_side_bwd_delta_rows; kDeltaWarpsPerCta warps a CTA). Also zeroes dq_global (p.zero, grid-stride), which
// the finish launch then adds into.
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

// CTAs [0, n_finish_ctas) run the band pass's finish warps (8 a CTA), the others one element of the (B, G, H * D) slot
// rows a thread (unused slots and bad positions: nothing).
template <typename T>
__global__ void longformer_bwd_finish_kernel(const LongformerBwdParams p) {
  if (blockIdx.x < p.n_finish_ctas) {  // CTA-uniform
    band_side_bwd_finish_warp<T>(p.band, 0);
    return;
  }
  const RowsParams& a = p.add;
  const int HD = a.H * a.D;
  const int64_t t = (blockIdx.x - p.n_finish_ctas) * blockDim.x + threadIdx.x;
  if (t >= (int64_t)a.B * a.G * HD) return;
  const int64_t bg = t / HD;
  const Slot slot = slot_at(a, (int)(bg / a.G), (int)(bg % a.G));
  if (slot.write) SplitRows<T>(a, slot).add(a, (int)(t % HD));
}

constexpr int kWarps = 8;  // finish: one band job a warp, or one slot element a thread

template <typename T>
cudaError_t run_small(const LongformerBwdParams& p, bool finish, cudaStream_t stream) {
  int64_t ctas;
  if (!finish) {
    const int64_t warps = delta_warps((int64_t)p.band.B * p.band.S * p.band.H) +
                          delta_warps((int64_t)p.rows.B * p.rows.S * p.rows.H);
    ctas = (warps + kDeltaWarpsPerCta - 1) / kDeltaWarpsPerCta;
  } else {
    const int64_t elements = (int64_t)p.add.B * p.add.G * p.add.H * p.add.D;
    ctas = p.n_finish_ctas + (elements + kWarps * 32 - 1) / (kWarps * 32);
  }
  if (ctas == 0) return cudaSuccess;
  if (finish) {
    longformer_bwd_finish_kernel<T><<<dim3((unsigned)ctas), kWarps * 32, 0, stream>>>(p);
  } else {
    longformer_bwd_delta_kernel<T><<<dim3((unsigned)ctas), kDeltaWarpsPerCta * 32, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t run_longformer_bwd(LongformerBwdParams p, bool bf16, cudaStream_t stream) {
  p.n_finish_ctas = (finish_warps(p.band).total() + kWarps - 1) / kWarps;
  const auto small = [&](bool finish) {
    return bf16 ? run_small<__nv_bfloat16>(p, finish, stream) : run_small<__half>(p, finish, stream);
  };
  cudaError_t err = small(false);
  if (err == cudaSuccess)
    err = dispatch_traits(bf16, p.band.D,
                          [&](auto traits) { return launch_longformer_bwd_dq<decltype(traits)>(p, stream); });
  if (err == cudaSuccess) err = run_band_side_bwd_dkdv(p.band, bf16, stream);
  if (err == cudaSuccess) err = small(true);
  if (err == cudaSuccess) err = run_band_side_bwd_dkdv(p.rows, bf16, stream);
  return err;
}

}  // namespace longattn
