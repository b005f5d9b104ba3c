// Shared by launch.cu and kernel_launch.h: the (dtype, head dim) and flag dispatch, and the dynamic-shared-memory
// opt-in.
#pragma once

#include <cuda_runtime.h>

#include "band_side/kernel_traits.h"
#include "band_side/params.h"

namespace longattn {

// The tile kernels' launches for one (dtype, head dim): defined in kernel_launch.h, instantiated once per (dtype, head
// dim) in instantiations/*.cu (so those are the only files that compile the tile kernels).
template <typename Traits>
cudaError_t launch_band_side_fwd(const BandSideParams& p, cudaStream_t stream);
template <typename Traits>
cudaError_t launch_band_side_bwd_dq(const BandSideParams& p, cudaStream_t stream);
template <typename Traits>
cudaError_t launch_band_side_bwd_dkdv(const BandSideParams& p, cudaStream_t stream);

// Calls f(Traits{}) for the runtime (dtype, head dim); the only instantiations that exist are these six per
// kernel (times the kernels' kDropout, kRanges, kHalo, kIndexed and kQueryIndex flags, see dispatch_flags).
template <typename F>
cudaError_t dispatch_traits(bool bf16, int head_dim, F&& f) {
  if (bf16) {
    switch (head_dim) {
      case 32: return f(BandSideTraits<__nv_bfloat16, 32>{});
      case 64: return f(BandSideTraits<__nv_bfloat16, 64>{});
      case 128: return f(BandSideTraits<__nv_bfloat16, 128>{});
    }
  } else {
    switch (head_dim) {
      case 32: return f(BandSideTraits<__half, 32>{});
      case 64: return f(BandSideTraits<__half, 64>{});
      case 128: return f(BandSideTraits<__half, 128>{});
    }
  }
  return cudaErrorInvalidValue;  // the API checks head_dim first; never reached
}

// Calls f.template operator()<kDropout, kRanges, kHalo, kIndexed, kQueryIndex>() for the call's attention dropout
// (p.rng), per-row key ranges (p.key_ranges / p.side_ranges), halo keys (p.halo_k) or dropout offset (p.drop_offset: a
// sequence-parallel shard, whose halo may be empty), indexed side keys (p.side_index, with the row masks p.query_mask /
// p.band_rows_only: Longformer's band pass) and indexed query rows (p.query_index: Longformer's global rows, always
// side_only). All five are template flags of every tile kernel, so a call without them runs exactly the code without
// them. Halo keys come without ranges or indices; indexed side keys with or without ranges (a packed Longformer's band
// pass: side ranges index the slots g, as side keys always do), each its own instantiation, so the band pass without
// ranges runs exactly the code without them; indexed query rows only with side_only (the kRanges walk) and never with
// the other two (the API refuses those together): 12 instantiations per kernel and (dtype, head dim), with and
// without dropout each (plain, ranges, halo, indexed side keys, indexed side keys with ranges, indexed query rows),
// not 32.
template <typename F>
cudaError_t dispatch_flags(const BandSideParams& p, F&& f) {
  if (p.query_index != nullptr)
    return p.rng != nullptr ? f.template operator()<true, true, false, false, true>()
                            : f.template operator()<false, true, false, false, true>();
  const bool key_ranges = p.key_ranges != nullptr || p.side_ranges != nullptr;
  if (p.side_index != nullptr || p.query_mask != nullptr || p.band_rows_only) {
    if (key_ranges)
      return p.rng != nullptr ? f.template operator()<true, true, false, true, false>()
                              : f.template operator()<false, true, false, true, false>();
    return p.rng != nullptr ? f.template operator()<true, false, false, true, false>()
                            : f.template operator()<false, false, false, true, false>();
  }
  if (p.halo_k != nullptr || p.drop_offset != 0)
    return p.rng != nullptr ? f.template operator()<true, false, true, false, false>()
                            : f.template operator()<false, false, true, false, false>();
  // side_only (Longformer's global rows: no band keys) runs the kRanges kernels, with or without ranges: only their
  // walk knows it (ranges.h query_tile_ranges; null ranges mask nothing), so the plain kernels are the code without it.
  const bool ranges = key_ranges || p.side_only;
  if (p.rng != nullptr)
    return ranges ? f.template operator()<true, true, false, false, false>()
                  : f.template operator()<true, false, false, false, false>();
  return ranges ? f.template operator()<false, true, false, false, false>()
                : f.template operator()<false, false, false, false, false>();
}

// Above 48 KiB of dynamic shared memory a kernel must opt in (once per kernel and device; cheap). Params: the
// kernel's one argument (BandSideParams, or Longformer's fused forward's LongformerFwdParams).
template <typename Kernel, typename Params>
cudaError_t launch_kernel(Kernel kernel, dim3 grid, int threads, int smem, const Params& p, cudaStream_t stream) {
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
  }
  kernel<<<grid, threads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename Traits>
dim3 query_tile_grid(const BandSideParams& p) {
  return dim3((p.S + Traits::kBlockM - 1) / Traits::kBlockM, p.B, p.H);
}

}  // namespace longattn
