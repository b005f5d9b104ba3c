// 16-bit bias tables (fp16 / bf16: what LongT5 models pass) converted to the float32 the tile kernels read, on the
// device by longattn's own code (no ATen cast): the forward runs band_side_bias_convert_kernel (launch.cu) just before
// the band kernel (only when a table is 16-bit: float32 tables are read in place), the backward's delta kernel (which
// runs before the dQ and dK/dV kernels) runs convert_bias_tables first. Why not read the tables in their dtype in the
// tile kernels: the per-element dtype switch in their innermost score loop grew them by a third (sm_90 SASS) and cost
// 15-30 % on an H200; a table is small (H x (left + right + 1), H x (2G + 1)), so the copy is cheap.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "band_side/params.h"

namespace longattn {

// Entry i of a 16-bit table of kind `kind` (kTableF16 or kTableBF16) as float32 (exact).
__device__ __forceinline__ float table16_at(const void* table, int kind, int64_t i) {
  return kind == kTableBF16 ? __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(table)[i])
                            : __half2float(reinterpret_cast<const __half*>(table)[i]);
}

// The float32 entries the conversion writes: the band table's, then the side table's (0 for a table that is float32
// or absent).
__host__ __device__ inline int64_t band_bias_convert_count(const BandSideParams& p) {
  return p.band_bias_in != nullptr ? (int64_t)p.H * p.band_width : 0;
}
__host__ __device__ inline int64_t bias_convert_count(const BandSideParams& p) {
  return band_bias_convert_count(p) + (p.side_bias_in != nullptr ? (int64_t)p.H * (2 * p.G + 1) : 0);
}

// band_bias_in / side_bias_in into the float32 workspaces band_bias / side_bias (params.h), grid-stride over the whole
// grid: entry e < band_bias_convert_count(p) is band entry e, the rest side entries.
__device__ __forceinline__ void convert_bias_tables(const BandSideParams& p) {
  const int64_t n_band = band_bias_convert_count(p), n = bias_convert_count(p);
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += stride) {
    if (e < n_band) {
      const_cast<float*>(p.band_bias)[e] = table16_at(p.band_bias_in, p.band_bias_kind, e);
    } else {
      const_cast<float*>(p.side_bias)[e - n_band] = table16_at(p.side_bias_in, p.side_bias_kind, e - n_band);
    }
  }
}

}  // namespace longattn
