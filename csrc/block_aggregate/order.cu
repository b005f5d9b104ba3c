// Order kernel of block aggregation: the stable counting sort of each row's tokens by block id, on the device, in
// one launch before the aggregate kernel (aggregate.h has the contract of perm / seg). Emulated statement by
// statement, and checked against a stable argsort + searchsorted, in tests/test_cuda_block_aggregate_emulation.py.
//
// One CTA per (row b, id tile [g0, g0 + kTile)): it writes seg[b, g0 .. g_hi) (and seg[b, G] from the last tile)
// and perm[b, seg[b, g0] .. seg[b, g_hi]), the slots of the tokens it owns (ids in its tile). CTAs share nothing:
// no zeroed memory (no memset launch), no global atomics; every count is an integer, so the result does not
// depend on scheduling. Ids are arbitrary (unsorted, -1 anywhere, values outside [0, G): dropped, never read
// through). Phases, all within the CTA:
//  1. Scan the whole row once (int4 loads, order free): base = kept tokens with an id below g0; a bit per chunk
//     (the row cut into at most kChunks chunks of 2^shift >= 32 tokens) marking the chunks holding owned tokens.
//  2. The marked chunks are split among the warps in sequence order (warp w takes the w-th sixteenth of them);
//     each warp counts its owned tokens per block into its row of `cursor` (kWarps x kTile int32).
//  3. Block starts: base + exclusive scan over the tile of the per-block totals -> seg; each warp's cursor of
//     block l = block l's start + the tokens of block l in earlier warps' chunks (earlier in the sequence).
//  4. Each warp re-walks its chunks in order, 32 tokens a step: token slot = its warp's cursor of its block + the
//     same-block tokens of lower lanes (__match_any_sync); the group's leader then advances the cursor. So each
//     block's tokens land in sequence order: exactly the stable sort.
//
// Measured on an H200 (2026-11-30) at S = 16384, G = 1024, B = 1: 10.8 us.
// Cost (predicted, not measured at this length), S = 131072, G = 8192, B = 1 (LongT5, blocks of 16): 64 CTAs
// of 512 threads, 40 registers, 8.4 KB of shared memory (sm_90, no spill). Phase 1 reads the row's 512 KB of ids
// from L2 once per CTA (32 MB in all, a quarter of the Triton order kernel's two passes with 64-id tiles; int4
// loads, 4 in flight per thread, ~4 instructions per id): ~5 us. Phases 2 and 4 read only the marked chunks: with
// sorted ids a CTA's 2048 owned tokens lie in ~16 chunks of 128 tokens, about one per warp; with random ids up to
// the whole row twice more, 32 tokens per warp step. The aggregate kernel reads all of x from DRAM (200 MB at
// C = 768 in bf16, 50-70 us). Phase 1's L2 reads grow as B * S * G / 32 bytes against x's 2 * B * S * C in bf16
// (G / (64 C): 1/6 at G = 8192, C = 768): the price of CTAs that share nothing.
#include <cstdint>

#include "block_aggregate/aggregate.h"

namespace longattn {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kTile = 128;    // block ids per CTA
constexpr int kChunks = 1024;  // chunk-mask bits: a row is cut into at most this many chunks
constexpr int kUnroll = 4;     // loads issued before their tokens are processed (memory-level parallelism)
constexpr unsigned kFull = 0xffffffffu;
static_assert(kTile <= kThreads && kTile % 32 == 0, "phase 3 gives each block of the tile one thread");
static_assert(kChunks == 32 * 32, "phase 2 scans the chunk mask's 32 words with one warp, a word per lane");

struct OrderShared {
  unsigned mask[kChunks / 32];    // bit c: chunk c holds a token of this CTA's tile
  int cursor[kWarps][kTile];      // phase 2: tokens per (warp, block); phase 4: each warp's next slot per block
  int warp_sum[kWarps];           // phase 1: kept tokens below g0 per warp; phase 3: tile totals per warp of 32
};

// Phase 1 for one token of this lane (id already loaded; -1 stands for "no token"): count it when kept and
// below the tile, and report whether the tile owns it.
__device__ __forceinline__ bool count_token(int id, int g0, int g_hi, int& below) {
  below += id >= 0 && id < g0;
  return id >= g0 && id < g_hi;
}

// Phase 1: mark the chunk of token s when owned. Warp-wide (every lane calls it; the owned tokens' chunks do not
// decrease with the lane), so a run of owned lanes in one chunk sets its bit once.
__device__ __forceinline__ void mark_chunk(OrderShared& sh, bool owned, int64_t s, int shift, int lane) {
  const int chunk = owned ? static_cast<int>(s >> shift) : -1;
  const int prev = __shfl_up_sync(kFull, chunk, 1);
  if (owned && (lane == 0 || prev != chunk)) atomicOr(&sh.mask[chunk >> 5], 1u << (chunk & 31));
}

// Phases 2 and 4: calls step(s, id) for every token of the marked chunks of rank [lo, hi) (rank: the chunk's
// place among the marked chunks), in sequence order, 32 consecutive tokens per warp-wide call (lane l: s0 + l;
// id = -1 past the row). `word` / `before`: lane i's mask word and the marked chunks in words < i.
template <typename F>
__device__ __forceinline__ void walk_chunks(const int* ids, int S, int shift, unsigned word, int before, int lo,
                                            int hi, int lane, F&& step) {
  for (int i = 0; i < kChunks / 32; ++i) {
    unsigned bits = __shfl_sync(kFull, word, i);
    int rank = __shfl_sync(kFull, before, i);
    if (rank >= hi) break;
    if (rank + __popc(bits) <= lo) continue;
    for (; bits != 0 && rank < hi; bits &= bits - 1, ++rank) {
      if (rank < lo) continue;
      const int64_t start = int64_t(i * 32 + __ffs(bits) - 1) << shift;
      const int64_t end = start + (int64_t(1) << shift) < S ? start + (int64_t(1) << shift) : S;
      for (int64_t s0 = start; s0 < end; s0 += 32 * kUnroll) {
        int id[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t s = s0 + u * 32 + lane;
          id[u] = s < end ? __ldg(ids + s) : -1;
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) step(static_cast<int>(s0 + u * 32 + lane), id[u]);
      }
    }
  }
}

__global__ void __launch_bounds__(kThreads) block_order_kernel(const AggregateParams p) {
  __shared__ OrderShared sh;
  const int b = blockIdx.y, g0 = blockIdx.x * kTile, S = p.S, G = p.G;
  const int g_hi = G - g0 < kTile ? G : g0 + kTile;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int* ids = p.ids + (int64_t)b * S;
  int shift = 5;  // chunks of 2^shift >= 32 tokens (whole warp steps), at most kChunks of them
  while ((int64_t(kChunks) << shift) < S) ++shift;
  for (int i = threadIdx.x; i < kChunks / 32; i += kThreads) sh.mask[i] = 0;
  for (int i = threadIdx.x; i < kWarps * kTile; i += kThreads) (&sh.cursor[0][0])[i] = 0;
  __syncthreads();

  // Phase 1: the whole row, in any order. `head` tokens before the first 16-byte boundary (int32 data is 4-byte
  // aligned: head < 4) and the < 4 after the last full int4 are warp 0's; the int4s are spread over all threads,
  // kUnroll per thread in flight.
  int below = 0;
  const int head = min(S, static_cast<int>((16 - (reinterpret_cast<uintptr_t>(ids) & 15)) & 15) / 4);
  const int nvec = (S - head) / 4;
  const int4* vec = reinterpret_cast<const int4*>(ids + head);
  for (int v0 = warp * 32; v0 < nvec; v0 += kThreads * kUnroll) {  // warp-uniform trip count
    int4 q[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int v = v0 + u * kThreads + lane;
      q[u] = v < nvec ? __ldg(vec + v) : make_int4(-1, -1, -1, -1);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t s = head + 4 * int64_t(v0 + u * kThreads + lane);  // the int4's first token
      const bool o0 = count_token(q[u].x, g0, g_hi, below), o1 = count_token(q[u].y, g0, g_hi, below);
      const bool o2 = count_token(q[u].z, g0, g_hi, below), o3 = count_token(q[u].w, g0, g_hi, below);
      if (__any_sync(kFull, o0 || o1 || o2 || o3)) {
        mark_chunk(sh, o0, s, shift, lane);
        mark_chunk(sh, o1, s + 1, shift, lane);
        mark_chunk(sh, o2, s + 2, shift, lane);
        mark_chunk(sh, o3, s + 3, shift, lane);
      }
    }
  }
  if (warp == 0) {
    const int tail = S - head - 4 * nvec;  // < 4
    const int s = lane < head ? lane : head + 4 * nvec + (lane - head);
    const bool owned = count_token(lane < head + tail ? ids[s] : -1, g0, g_hi, below);
    if (__any_sync(kFull, owned)) mark_chunk(sh, owned, s, shift, lane);
  }
#pragma unroll
  for (int off = 16; off > 0; off /= 2) below += __shfl_xor_sync(kFull, below, off);
  if (lane == 0) sh.warp_sum[warp] = below;
  __syncthreads();
  int base = 0;
  for (int w = 0; w < kWarps; ++w) base += sh.warp_sum[w];

  // This warp's share of the marked chunks: ranks [lo, hi) of `marked`, in sequence order.
  const unsigned word = sh.mask[lane];
  int before = __popc(word);
#pragma unroll
  for (int off = 1; off < 32; off *= 2) {
    const int v = __shfl_up_sync(kFull, before, off);
    if (lane >= off) before += v;
  }
  const int marked = __shfl_sync(kFull, before, 31);
  before -= __popc(word);  // exclusive
  const int lo = marked * warp / kWarps, hi = marked * (warp + 1) / kWarps;
  int* cursor = sh.cursor[warp];

  // Phase 2: tokens per block in this warp's chunks (one shared atomic per group of same-block lanes).
  walk_chunks(ids, S, shift, word, before, lo, hi, lane, [&](int, int id) {
    const bool owned = id >= g0 && id < g_hi;
    const unsigned owners = __ballot_sync(kFull, owned);
    if (owned) {
      const unsigned peers = __match_any_sync(owners, id);
      if (lane == __ffs(peers) - 1) atomicAdd(&cursor[id - g0], __popc(peers));
    }
  });
  __syncthreads();

  // Phase 3: thread l < kTile owns block g0 + l: its total, the exclusive scan of the totals (a warp scan, then
  // the warp totals in order), seg, and every warp's starting cursor.
  const int l = threadIdx.x;
  int total = 0, scan = 0;
  if (l < kTile) {
    for (int w = 0; w < kWarps; ++w) total += sh.cursor[w][l];
    scan = total;
#pragma unroll
    for (int off = 1; off < 32; off *= 2) {
      const int v = __shfl_up_sync(kFull, scan, off);
      if (lane >= off) scan += v;
    }
    if (lane == 31) sh.warp_sum[warp] = scan;
  }
  __syncthreads();
  if (l < kTile) {
    int start = base + scan - total;
    for (int w = 0; w < warp; ++w) start += sh.warp_sum[w];
    int* seg = p.seg + (int64_t)b * (G + 1);
    if (g0 + l < g_hi) seg[g0 + l] = start;
    if (g0 + l == G - 1) seg[G] = start + total;
    for (int w = 0; w < kWarps; ++w) {
      const int n = sh.cursor[w][l];
      sh.cursor[w][l] = start;
      start += n;
    }
  }
  __syncthreads();

  // Phase 4: the slots, each block's tokens in sequence order.
  int* perm = p.perm + (int64_t)b * S;
  const unsigned lower = (1u << lane) - 1;
  walk_chunks(ids, S, shift, word, before, lo, hi, lane, [&](int s, int id) {
    const bool owned = id >= g0 && id < g_hi;
    const unsigned owners = __ballot_sync(kFull, owned);
    if (owners == 0) return;
    unsigned peers = 0;
    int slot = 0;
    if (owned) {
      peers = __match_any_sync(owners, id);
      slot = cursor[id - g0] + __popc(peers & lower);
    }
    __syncwarp();  // every lane has read its block's cursor before the leaders advance it
    if (owned && lane == __ffs(peers) - 1) cursor[id - g0] += __popc(peers);
    __syncwarp();
    if (owned) perm[slot] = s;
  });
}

}  // namespace

cudaError_t run_block_order(const AggregateParams& p, cudaStream_t stream) {
  block_order_kernel<<<dim3((p.G + kTile - 1) / kTile, p.B), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace longattn
