// Kernels of block aggregation; see aggregate.h for the contract and the determinism argument.
#include "block_aggregate/aggregate.h"

#include <cstdint>
#include <limits>

#include "common/ptx.h"

namespace longattn {
namespace {

constexpr int kThreads = 256;

// Sum of one value per thread over the block, in a fixed order (shuffle tree, then warp sums in order);
// every thread gets the result.
__device__ float block_sum(float v, float* scratch) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.f;
    for (int w = 0; w < kThreads / 32; ++w) total += scratch[w];
    scratch[kThreads / 32] = total;
  }
  __syncthreads();
  return scratch[kThreads / 32];
}

// weight[c] as float32, whatever its dtype (uniform branch).
__device__ __forceinline__ float weight_at(const AggregateParams& p, int c) {
  const int64_t i = c * p.w_s;
  switch (p.wdtype) {
    case AggDType::kFloat16: return to_float(static_cast<const __half*>(p.weight)[i]);
    case AggDType::kBFloat16: return to_float(static_cast<const __nv_bfloat16*>(p.weight)[i]);
    default: return static_cast<const float*>(p.weight)[i];
  }
}

// One CTA per (g, b): segment sum per channel, then (with weight) the RMS norm of the row.
template <typename T>
__global__ void __launch_bounds__(kThreads) aggregate_fwd_kernel(const AggregateParams p) {
  __shared__ float scratch[kThreads / 32 + 1];
  const int g = blockIdx.x, b = blockIdx.y;
  const int64_t row = (int64_t)b * p.G + g;
  const int start = p.seg[b * (int64_t)(p.G + 1) + g], end = p.seg[b * (int64_t)(p.G + 1) + g + 1];
  const T* x = reinterpret_cast<const T*>(p.x) + b * p.x_sb;
  const int32_t* perm = p.perm + (int64_t)b * p.S;
  T* out = reinterpret_cast<T*>(p.out) + row * p.C;
  float sq = 0.f;
  for (int c = threadIdx.x; c < p.C; c += kThreads) {
    float acc = 0.f;
    for (int r = start; r < end; ++r) acc += to_float(x[perm[r] * p.x_ss + c]);
    if (p.weight != nullptr) {
      p.sums[row * p.C + c] = acc;  // re-read below by this same thread
      sq += acc * acc;
    } else {
      out[c] = from_float<T>(acc);
    }
  }
  if (p.weight == nullptr) return;  // uniform across the CTA
  const float rs = rsqrtf(block_sum(sq, scratch) / p.C + p.eps);
  if (threadIdx.x == 0) p.rstd[row] = rs;
  for (int c = threadIdx.x; c < p.C; c += kThreads)
    out[c] = from_float<T>(weight_at(p, c) * p.sums[row * p.C + c] * rs);
}

// With weight: dsums = rstd * w * dy - sums * rstd^3 * mean(sums * w * dy), one CTA per (g, b).
template <typename T>
__global__ void __launch_bounds__(kThreads) aggregate_dsums_kernel(const AggregateParams p) {
  __shared__ float scratch[kThreads / 32 + 1];
  const int g = blockIdx.x, b = blockIdx.y;
  const int64_t row = (int64_t)b * p.G + g;
  const T* dy = reinterpret_cast<const T*>(p.dout) + b * p.do_sb + g * p.do_sg;
  const float* sums = p.sums_in + row * p.C;
  float dot = 0.f;
  for (int c = threadIdx.x; c < p.C; c += kThreads) dot += sums[c] * weight_at(p, c) * to_float(dy[c]);
  const float mean = block_sum(dot, scratch) / p.C;
  const float rs = p.rstd_in[row];
  for (int c = threadIdx.x; c < p.C; c += kThreads)
    p.dsums[row * p.C + c] = rs * weight_at(p, c) * to_float(dy[c]) - sums[c] * rs * rs * rs * mean;
}

// dx[b, s] = dsums[b, id] (or dout[b, id] without weight); 0 for dropped tokens.
//
// aggregate_dx_chunks_kernel: kDxChunk = 16 bytes of dx a thread (8 channels of a 16-bit dtype, 4 of float32), the
// threads over (b, s, chunk) with the chunk fastest, so a warp stores 512 contiguous bytes and reads its sources in
// 16-byte loads (dsums: float32 rows of C, 2 or 1 loads a chunk; dout: 1). Taken when every chunk is 16-byte aligned
// (dx_chunks_ok: C a multiple of the chunk, and dout's pointer and strides with it without a weight), else
// aggregate_dx_kernel: one CTA per (s, b), a thread per channel. Both write the same bits (one rounding per element).
// Why: one CTA of 256 threads per token, 3 two-byte stores a thread at LongT5-base's C = 768, took 24 us on the H200
// (2026-11-30, S = 16384, bf16) for 25 MB written (about 5 us of the H200's bandwidth): bound by scheduling 16384
// short CTAs, not by bytes.
constexpr int kDxChunk = 16;

template <typename T>
__device__ __forceinline__ void load_chunk(const T* src, float (&v)[kDxChunk / sizeof(T)]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(src);
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (sizeof(T) == 4) {
      v[i] = __uint_as_float(words[i]);
    } else {
      const float2 f = unpack2<T>(words[i]);
      v[2 * i] = f.x;
      v[2 * i + 1] = f.y;
    }
  }
}

template <typename T>
__device__ __forceinline__ void store_chunk(T* dst, const float (&v)[kDxChunk / sizeof(T)]) {
  uint32_t words[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (sizeof(T) == 4) {
      words[i] = __float_as_uint(v[i]);
    } else {
      words[i] = pack2<T>(v[2 * i], v[2 * i + 1]);
    }
  }
  *reinterpret_cast<uint4*>(dst) = make_uint4(words[0], words[1], words[2], words[3]);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) aggregate_dx_chunks_kernel(const AggregateParams p) {
  constexpr int V = kDxChunk / sizeof(T);
  const int chunks = p.C / V;
  const int64_t t = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  if (t >= (int64_t)p.B * p.S * chunks) return;
  const int64_t bs = t / chunks;  // b * S + s
  const int c0 = (int)(t % chunks) * V;
  const int64_t b = bs / p.S;
  const int id = p.ids[bs];
  float v[V];
  if (id >= 0 && id < p.G) {  // out-of-range ids are dropped, never read through
    if (p.weight != nullptr) {
      const float4* src = reinterpret_cast<const float4*>(p.dsums + (b * p.G + id) * p.C + c0);
#pragma unroll
      for (int i = 0; i < V / 4; ++i) {
        const float4 f = src[i];
        v[4 * i] = f.x;
        v[4 * i + 1] = f.y;
        v[4 * i + 2] = f.z;
        v[4 * i + 3] = f.w;
      }
    } else {
      load_chunk<T>(reinterpret_cast<const T*>(p.dout) + b * p.do_sb + id * p.do_sg + c0, v);
    }
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) v[i] = 0.f;
  }
  store_chunk<T>(reinterpret_cast<T*>(p.dx) + bs * p.C + c0, v);
}

// Whether every 16-byte chunk of the dx launch is aligned (dx and dsums: allocations of C-element rows).
bool dx_chunks_ok(const AggregateParams& p, int element_bytes) {
  const int V = kDxChunk / element_bytes;
  const auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % kDxChunk == 0; };
  if (p.C % V != 0 || !aligned(p.dx)) return false;
  if (p.weight != nullptr) return aligned(p.dsums);
  return aligned(p.dout) && p.do_sb % V == 0 && p.do_sg % V == 0;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) aggregate_dx_kernel(const AggregateParams p) {
  const int s = blockIdx.x, b = blockIdx.y;
  const int id = p.ids[(int64_t)b * p.S + s];
  T* dx = reinterpret_cast<T*>(p.dx) + ((int64_t)b * p.S + s) * p.C;
  const bool keep = id >= 0 && id < p.G;  // out-of-range ids are dropped, never read through
  for (int c = threadIdx.x; c < p.C; c += kThreads) {
    float v = 0.f;
    if (keep) {
      v = p.weight != nullptr ? p.dsums[((int64_t)b * p.G + id) * p.C + c]
                              : to_float(reinterpret_cast<const T*>(p.dout)[b * p.do_sb + id * p.do_sg + c]);
    }
    dx[c] = from_float<T>(v);
  }
}

// dweight[c] = sum over rows (b, g) of dy * sums * rstd, in float32: a CTA per 32 channels (lane = channel, so each
// row's dy and sums are read coalesced), its kDweightWarps warps taking rows g = w, w + kDweightWarps, ... of each b,
// kDweightUnroll rows a step (their loads independent, in flight together), then the warps' sums added in warp order
// by warp 0: a fixed order, deterministic.
// Why not one thread per channel over all rows (the previous form): C / 256 CTAs (3 at LongT5-base's C = 768) each
// walked B * G rows serially, one dependent round of loads a row: 83 us on the H200 (2026-11-30, S = 16384, G = 1024,
// bf16) to read 4.5 MB that the dsums kernel just before left in L2.
constexpr int kDweightWarps = 32;
constexpr int kDweightUnroll = 4;

template <typename T>
__global__ void __launch_bounds__(kDweightWarps * 32) aggregate_dweight_kernel(const AggregateParams p) {
  __shared__ float warp_sums[kDweightWarps][32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int c = blockIdx.x * 32 + lane;
  float acc = 0.f;
  if (c < p.C) {
    for (int b = 0; b < p.B; ++b) {
      const T* dy = reinterpret_cast<const T*>(p.dout) + b * p.do_sb + c;
      const int64_t row0 = (int64_t)b * p.G;
      for (int g0 = warp; g0 < p.G; g0 += kDweightWarps * kDweightUnroll) {
#pragma unroll
        for (int u = 0; u < kDweightUnroll; ++u) {
          const int g = g0 + u * kDweightWarps;
          if (g < p.G) acc += to_float(dy[g * p.do_sg]) * p.sums_in[(row0 + g) * p.C + c] * p.rstd_in[row0 + g];
        }
      }
    }
  }
  warp_sums[warp][lane] = acc;
  __syncthreads();
  if (warp != 0 || c >= p.C) return;
  float total = 0.f;
  for (int w = 0; w < kDweightWarps; ++w) total += warp_sums[w][lane];
  switch (p.wdtype) {  // rounded once, to the weight's dtype
    case AggDType::kFloat16: static_cast<__half*>(p.dweight)[c] = from_float<__half>(total); break;
    case AggDType::kBFloat16: static_cast<__nv_bfloat16*>(p.dweight)[c] = from_float<__nv_bfloat16>(total); break;
    default: static_cast<float*>(p.dweight)[c] = total;
  }
}

template <typename F>
cudaError_t dispatch_dtype(AggDType dtype, F&& f) {
  switch (dtype) {
    case AggDType::kFloat32: return f(float{});
    case AggDType::kFloat16: return f(__half{});
    case AggDType::kBFloat16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t run_block_aggregate_fwd(const AggregateParams& p, cudaStream_t stream) {
  const cudaError_t err = run_block_order(p, stream);
  if (err != cudaSuccess) return err;
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    aggregate_fwd_kernel<T><<<dim3(p.G, p.B), kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

cudaError_t run_block_aggregate_bwd(const AggregateParams& p, cudaStream_t stream) {
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    // A zero-sized grid is a launch error, so empty dimensions skip their kernel (nothing to compute).
    if (p.weight != nullptr && p.G > 0 && p.B > 0)
      aggregate_dsums_kernel<T><<<dim3(p.G, p.B), kThreads, 0, stream>>>(p);
    if (p.weight != nullptr && p.C > 0)
      aggregate_dweight_kernel<T><<<dim3((p.C + 31) / 32), kDweightWarps * 32, 0, stream>>>(p);
    if (p.S > 0 && p.B > 0) {
      const int64_t chunk_ctas = ((int64_t)p.B * p.S * (p.C / (kDxChunk / (int)sizeof(T))) + kThreads - 1) / kThreads;
      if (dx_chunks_ok(p, sizeof(T)) && chunk_ctas <= std::numeric_limits<int32_t>::max()) {
        if (chunk_ctas > 0) aggregate_dx_chunks_kernel<T><<<dim3((unsigned)chunk_ctas), kThreads, 0, stream>>>(p);
      } else {
        aggregate_dx_kernel<T><<<dim3(p.S, p.B), kThreads, 0, stream>>>(p);
      }
    }
    return cudaGetLastError();
  });
}

}  // namespace longattn
