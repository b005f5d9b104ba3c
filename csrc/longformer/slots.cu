// The slot layout of Longformer's global tokens, bitwise equal to _longformer.global_slots (rows.h):
//   is_global = global_mask & key_padding_mask; band_rows = real & ~is_global;
//   pos[b, :G] = the first G entries of a stable descending argsort of is_global[b] (the globals in sequence order,
//   then the non-globals in sequence order); used[b, g] = is_global[b, pos[b, g]].
//
// One CTA per batch row walks the row in chunks of kThreads * kItems tokens, thread t owning kItems consecutive
// tokens, with a block-wide exclusive prefix count of the globals (warp shuffles, then the warps' totals) and the
// count before the chunk carried: global r < G goes to slot r. Non-global slots need the row's count n, known only
// after the walk, but no second full walk: the r'-th non-global with n + r' < G sits at s = r' + (globals before s)
// <= r' + n < G, so a second walk over [0, G) (none when n >= G) places them. The slot of each position is a
// bijection of [0, S), so every one of the G slots is written exactly once (outputs need no initialisation).
//
// With `zero` (Longformer's fused forward, fused.h) the CTAs also zero its zero_count arrival counters, strided over
// the grid: one store per thread for the few counters a call has (B * H * ceil(G / 64)).
//
// Measured on an H200 (2026-11-30) at S = 16384, B = 1: 8.0 us.
// Cost (a prediction, not measured at this length): 2 bytes read and 1 written per token, latency-bound on
// one SM per row: at S = 131072, 8 chunks of one 16-byte load per mask and thread plus a block scan (3 barriers),
// about 10-20 us for B = 1 (rows side by side for larger B), in place of and / xor / argsort (a radix sort) / gather.
#include "longformer/rows.h"

namespace longattn {
namespace {

constexpr int kThreads = 1024;
constexpr int kItems = 16;  // consecutive tokens per thread (one 16-byte load per mask): a chunk is 16384 tokens
constexpr int kWarps = kThreads / 32;
static_assert(kWarps <= 32 && 2 * kItems <= 32, "one warp scans the warps' totals; a thread's bits fit 32");

// Exclusive prefix sum of `count` over the CTA's threads in thread order -> (before this thread, CTA total).
// `scratch`: kWarps + 1 ints of shared memory; the call ends with a barrier, so it may be reused at once.
__device__ __forceinline__ int2 block_exclusive_scan(int count, int* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int inclusive = count;
#pragma unroll
  for (int off = 1; off < 32; off *= 2) {
    const int up = __shfl_up_sync(0xffffffffu, inclusive, off);
    if (lane >= off) inclusive += up;
  }
  if (lane == 31) scratch[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {  // scan of the warps' totals (kWarps <= 32)
    const int total = lane < kWarps ? scratch[lane] : 0;
    int incl = total;
#pragma unroll
    for (int off = 1; off < 32; off *= 2) {
      const int up = __shfl_up_sync(0xffffffffu, incl, off);
      if (lane >= off) incl += up;
    }
    if (lane < kWarps) scratch[lane] = incl - total;  // exclusive
    if (lane == kWarps - 1) scratch[kWarps] = incl;
  }
  __syncthreads();
  const int2 r = make_int2(scratch[warp] + inclusive - count, scratch[kWarps]);
  __syncthreads();  // everyone has read scratch before the next call writes it
  return r;
}

// The kItems mask bytes of tokens s0 .. s0 + kItems - 1 (0 from `end` on): one 16-byte load when the row is dense and
// aligned there, else byte by byte through the strides.
__device__ __forceinline__ void load_mask(uint8_t (&m)[kItems], const uint8_t* row, int64_t stride, int s0, int end) {
  if (stride == 1 && s0 + kItems <= end && (reinterpret_cast<uintptr_t>(row + s0) & 15) == 0) {
    const uint4 v = *reinterpret_cast<const uint4*>(row + s0);
    const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < kItems; ++i) m[i] = (words[i / 4] >> (8 * (i % 4))) & 0xffu;
    return;
  }
#pragma unroll
  for (int i = 0; i < kItems; ++i) m[i] = s0 + i < end ? row[(s0 + i) * stride] : 0;
}

// Bit i of the result: token s0 + i is a global (real and marked); bit kItems + i: a real token. Tokens >= end: 0.
__device__ __forceinline__ uint32_t load_tokens(const SlotsParams& p, int b, int s0, int end) {
  uint8_t glob[kItems], real[kItems];
  load_mask(glob, p.global_mask + b * p.gm_sb, p.gm_ss, s0, end);
  if (p.pad_mask != nullptr) {
    load_mask(real, p.pad_mask + b * p.pm_sb, p.pm_ss, s0, end);
  } else {
#pragma unroll
    for (int i = 0; i < kItems; ++i) real[i] = s0 + i < end;
  }
  uint32_t bits = 0;
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const bool r = real[i] != 0;
    bits |= (uint32_t(r && glob[i] != 0) << i) | (uint32_t(r) << (kItems + i));
  }
  return bits;
}

__global__ void __launch_bounds__(kThreads) global_slots_kernel(const SlotsParams p) {
  __shared__ int scratch[kWarps + 1];
  const int b = blockIdx.x;
  // The fused forward's arrival counters (a few per (b, h)): zeroed by this launch, read by the next one.
  for (int64_t i = (int64_t)b * kThreads + threadIdx.x; i < p.zero_count; i += (int64_t)gridDim.x * kThreads)
    p.zero[i] = 0;
  int64_t* pos = p.pos + (int64_t)b * p.G;
  uint8_t* used = p.used + (int64_t)b * p.G;
  uint8_t* band_rows = p.band_rows + (int64_t)b * p.S;
  constexpr uint32_t kGlobalBits = (1u << kItems) - 1;
  int n = 0;  // globals before the chunk; after the walk, the row's count (CTA-uniform)
  for (int c0 = 0; c0 < p.S; c0 += kThreads * kItems) {
    const int s0 = c0 + threadIdx.x * kItems;
    const uint32_t bits = load_tokens(p, b, s0, p.S);
#pragma unroll
    for (int i = 0; i < kItems; ++i)
      if (s0 + i < p.S) band_rows[s0 + i] = ((bits >> (kItems + i)) & ~(bits >> i)) & 1u;
    const int2 scan = block_exclusive_scan(__popc(bits & kGlobalBits), scratch);
    if (n < p.G && scan.y > 0) {  // CTA-uniform: only chunks holding one of the first G globals place any
      int rank = n + scan.x;
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        if (((bits >> i) & 1u) == 0) continue;
        if (rank < p.G) {
          pos[rank] = s0 + i;
          used[rank] = 1;
        }
        ++rank;
      }
    }
    n += scan.y;
  }
  // The non-global slots n + r' < G: their tokens lie in [0, G) (see the top of the file).
  int placed = 0;  // non-globals before the chunk (CTA-uniform)
  const int end = min(p.G, p.S);
  for (int c0 = 0; c0 < end && n + placed < p.G; c0 += kThreads * kItems) {
    const int s0 = c0 + threadIdx.x * kItems;
    const uint32_t bits = load_tokens(p, b, s0, end);
    const int valid = max(0, min(kItems, end - s0));  // tokens of this thread inside [0, end)
    const uint32_t nonglobal = ~bits & ((1u << valid) - 1u);
    const int2 scan = block_exclusive_scan(__popc(nonglobal), scratch);
    int slot = n + placed + scan.x;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      if (((nonglobal >> i) & 1u) == 0) continue;
      if (slot < p.G) {
        pos[slot] = s0 + i;
        used[slot] = 0;
      }
      ++slot;
    }
    placed += scan.y;
  }
}

}  // namespace

cudaError_t run_global_slots(const SlotsParams& p, cudaStream_t stream) {
  if (p.B == 0 || p.S == 0) return cudaSuccess;  // nothing to write (G <= S)
  global_slots_kernel<<<p.B, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace longattn
