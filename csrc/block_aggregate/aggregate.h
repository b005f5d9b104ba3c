// Block aggregation (LongT5's side tokens): segment sums of x by block id, optionally RMS-normalised and
// scaled by a weight, forward and backward. Host entry points; kernels in order.cu (the forward's stable counting
// sort of token indices by block id) and aggregate.cu (the rest).
//
// Determinism: the forward's first kernel orders each row's token indices by block id (stably: each block's
// tokens in sequence order), so every output row is a sum over its own tokens in sequence order by a single
// thread per channel -- no atomics. Reductions over channels (the RMS statistic) and over rows (dweight) use
// fixed-order trees / loops.
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
  const int32_t* ids;      // (B, S) block ids, contiguous; ids outside [0, G) (-1 and any other) are dropped
  // Forward scratch, written by the order kernel and read by the aggregate kernel: block g of row b owns
  // perm[b, seg[b, g] .. seg[b, g + 1]), its token indices in sequence order; seg[b, 0] = 0 and slots from
  // seg[b, G] on (the dropped tokens') are never written nor read.
  int32_t* perm;  // (B, S)
  int32_t* seg;   // (B, G + 1)
  const void* weight;  // (C,) in wdtype, stride w_s, or nullptr
  int64_t w_s;
  AggDType wdtype;
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
  void* dweight;   // (C,) contiguous, wdtype (weight only)
};

// Forward: 2 launches, the order kernel (perm, seg) then the aggregate kernel. Needs B, G >= 1.
cudaError_t run_block_aggregate_fwd(const AggregateParams& p, cudaStream_t stream);
cudaError_t run_block_order(const AggregateParams& p, cudaStream_t stream);  // order.cu; the forward's first launch
cudaError_t run_block_aggregate_bwd(const AggregateParams& p, cudaStream_t stream);

}  // namespace longattn
