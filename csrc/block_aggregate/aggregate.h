// Block aggregation (LongT5's side tokens): segment sums of x by block id, optionally RMS-normalised and
// scaled by a weight, forward and backward. Host entry points; kernels in aggregate.cu.
//
// Determinism: the API sorts token indices by block id (stable sort), so every output row is a sum over
// its own tokens in sequence order by a single thread per channel -- no atomics. Reductions over
// channels (the RMS statistic) and over rows (dweight) use fixed-order trees / loops.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace longattn {

enum class AggDType { kFloat32, kFloat16, kBFloat16 };

struct AggregateParams {
  int B, S, C, G;
  AggDType dtype;
  const void* x;  // (B, S, C), channel dim contiguous
  int64_t x_sb, x_ss;
  const int32_t* ids;      // (B, S) block ids (-1 = dropped)
  const int64_t* perm;     // (B, S): token indices sorted by block id (stable)
  const int64_t* seg;      // (B, G + 1): block g owns perm[seg[g] .. seg[g + 1])
  const float* weight;     // (C,) float32 or nullptr
  float eps;
  // forward outputs
  void* out;    // (B, G, C) in x's dtype
  float* sums;  // (B, G, C) float32 (weight only)
  float* rstd;  // (B, G) float32 (weight only)
  // backward
  const void* dout;  // (B, G, C), channel dim contiguous
  int64_t do_sb, do_sg;
  const float* sums_in;  // saved by the forward (weight only)
  const float* rstd_in;
  float* dsums;    // (B, G, C) float32 scratch (weight only)
  void* dx;        // (B, S, C) contiguous, x's dtype
  float* dweight;  // (C,) float32 (weight only)
};

cudaError_t run_block_aggregate_fwd(const AggregateParams& p, cudaStream_t stream);
cudaError_t run_block_aggregate_bwd(const AggregateParams& p, cudaStream_t stream);

}  // namespace longattn
