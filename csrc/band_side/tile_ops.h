// Device building blocks shared by the forward, dQ and dK/dV kernels: which key tiles a query tile
// visits, async tile loads, the score function (scale, masks, biases) and the two warp-level GEMMs.
// Writing them once is what keeps the three kernels consistent with each other: the backward recomputes
// exactly the scores the forward produced.
#pragma once

#include <math.h>

#include "band_side/kernel_traits.h"
#include "band_side/params.h"

namespace longattn {

// ------------------------------------------------------------------------------------------------
// Which tiles meet which.
// ------------------------------------------------------------------------------------------------

// floor(a / b) for b > 0 (halo key tiles have negative indices; C++ division truncates).
__device__ __forceinline__ int floor_div(int a, int b) { return (a >= 0 ? a : a - b + 1) / b; }

// The key tiles of the band of query tile [m0, m0 + BM): keys j with i - left <= j <= i + right for some
// i in the tile, clipped to [0, S) (kHalo: to [-halo_left, S + halo_right); tiles stay aligned to local 0, so
// the ones inside [0, S) are exactly the tiles without a halo). Tiles outside the band are never visited.
template <int BM, int BN, bool kHalo = false>
struct BandKeyTiles {
  int first, count;
  __device__ BandKeyTiles(const BandSideParams& p, int m0) {
    if constexpr (kHalo) {
      const int lo = max(-p.halo_left, m0 - p.left);
      const int hi = min(p.S + p.halo_right - 1, min(p.S - 1, m0 + BM - 1) + p.right);
      first = floor_div(lo, BN);
      count = floor_div(hi, BN) - first + 1;  // >= 1: lo <= m0 <= hi
    } else {
      const int lo = max(0, m0 - p.left);
      const int hi = min(p.S - 1, min(p.S - 1, m0 + BM - 1) + p.right);
      first = lo / BN;
      count = hi / BN - first + 1;
    }
  }
};

// The tiles a query tile's walk visits (walk_key_tiles): band key tiles [band_first, + band_count), then
// side-key tiles [side_first, + side_count).
struct KeyTileWalk {
  int band_first, band_count, side_first, side_count;
};

// The query tiles that see band key tile [n0, n0 + BN): i in [0, S) with j - right <= i <= j + left. kHalo:
// n0 may be negative or past S (halo key tiles), and a tile no query sees gets count 0.
template <int BM, int BN, bool kHalo = false>
struct BandQueryTiles {
  int first, count;
  __device__ BandQueryTiles(const BandSideParams& p, int n0) {
    if constexpr (kHalo) {
      const int lo = max(0, n0 - p.right);
      const int hi = min(p.S - 1, n0 + BN - 1 + p.left);
      first = lo / BM;
      count = lo > hi ? 0 : hi / BM - first + 1;
    } else {
      const int lo = max(0, n0 - p.right);
      const int hi = min(p.S - 1, min(p.S - 1, n0 + BN - 1) + p.left);
      first = lo / BM;
      count = hi / BM - first + 1;
    }
  }
};

// True when every (query, key) pair of the tile is inside the band and every key < S, so the per-element
// range test can be skipped (interior tiles: all of them except the band's two edges and the last tile).
// Query rows >= S need no test: their output is never stored and their lse is +inf in the backward.
// kHalo: also every key >= 0, so halo keys (and their mask) are only ever met on tiles that test each element.
template <int BM, int BN, bool kHalo = false>
__device__ __forceinline__ bool band_tile_is_interior(const BandSideParams& p, int m0, int n0) {
  return (!kHalo || n0 >= 0) && n0 + BN <= p.S && n0 >= m0 + BM - 1 - p.left && n0 + BN - 1 <= m0 + p.right;
}

// kHalo: the row of halo_k / halo_v (and the column of halo_mask) holding band key j outside [0, S), or -1 when
// j is outside [-halo_left, S + halo_right) too.
__device__ __forceinline__ int halo_row(const BandSideParams& p, int j) {
  const int row = j < 0 ? p.halo_left + j : p.halo_left + (j - p.S);
  return row >= 0 && row < p.halo_left + p.halo_right ? row : -1;
}

// ------------------------------------------------------------------------------------------------
// Scores.
// ------------------------------------------------------------------------------------------------

// Where a tile's keys come from: band keys (rows of k/v, limit S) or side keys (rows of side_k/side_v,
// limit G). Resolved once per tile.
struct KeyTile {
  bool side;
  int key0;          // first key (band position j, or side index g)
  bool check_range;  // edge tile: test each element's key range
};

__device__ __forceinline__ int clamp_query_block(const BandSideParams& p, int b, int i) {
  // Values outside [-1, G-1] would index outside the (2G+1)-entry table; clamping the block id keeps
  // the table index g - qb + G inside [1, 2G] for every g in [0, G).
  if (p.side_bias == nullptr || i >= p.S) return -1;
  const int qb = p.query_block[(int64_t)b * p.S + i];
  return min(max(qb, -1), p.G - 1);
}

// s plus band_bias[h, key - i + left] (the pair is inside the window).
__device__ __forceinline__ float plus_band_bias(const BandSideParams& p, float s, int i, int key, int h) {
  return p.band_bias != nullptr ? s + __ldg(p.band_bias + (int64_t)h * p.band_width + (key - i + p.left)) : s;
}

// kHalo: score_log2 of a band key outside [0, S), s = <q_i, k> * scale: -inf outside [-halo_left, S + halo_right),
// outside the window, or where halo_mask is False.
__device__ __forceinline__ float halo_score_log2(const BandSideParams& p, float s, int i, int key, int b, int h) {
  const int row = halo_row(p, key);
  if (row < 0 || key < i - p.left || key > i + p.right) return -INFINITY;
  if (p.halo_mask != nullptr && !p.halo_mask[(int64_t)b * (p.halo_left + p.halo_right) + row]) return -INFINITY;
  return plus_band_bias(p, s, i, key, h) * kLog2e;
}

// Bit c of the result is set where key t.key0 + c (c in [0, 64)) passes the tile's key mask (band_key_mask for band
// tiles, side_mask for side tiles); keys outside [0, S) or [0, G) get 0 (range tests or the halo path decide them
// first). All bits are set when the mask is absent. Called by every lane of the warp.
//
// Why a bitmask: reading the mask per score element cost a byte load and a branch that waits on it for each of the
// thread's 32 elements per tile (sm_90 SASS of the previous form, CUDA 13.0: 64 LDG.U8 in the tile loop of every tile
// kernel, the dK/dV's included), and Longformer's band pass always carries a key mask (its global keys are masked out
// of the band). Two coalesced byte loads and two ballots per warp and tile replace them (per CTA in the dK/dV kernel).
__device__ __forceinline__ uint64_t tile_key_bits(const BandSideParams& p, const KeyTile& t, int b, int lane) {
  const uint8_t* mask = t.side ? p.side_mask : p.band_key_mask;
  if (mask == nullptr) return ~0ull;
  const int limit = t.side ? p.G : p.S;
  const uint8_t* row = mask + (int64_t)b * limit;
  const int lo = t.key0 + lane, hi = lo + 32;
  const uint32_t lo_bits = __ballot_sync(0xffffffffu, lo >= 0 && lo < limit && row[lo]);
  const uint32_t hi_bits = __ballot_sync(0xffffffffu, hi >= 0 && hi < limit && row[hi]);
  return (uint64_t)hi_bits << 32 | lo_bits;
}

// Keys as fragment columns (forward, dQ): tile_key_bits shifted to this lane's columns, so that element (n, e) reads
// bit n * 8 + (e & 1) of it (column_key_kept) -- a position known at compile time, one bit test per element.
__device__ __forceinline__ uint64_t column_key_bits(const BandSideParams& p, const KeyTile& t, int b, int lane) {
  return tile_key_bits(p, t, b, lane) >> (lane % 4 * 2);
}
__device__ __forceinline__ bool column_key_kept(uint64_t column_bits, int n, int e) {
  return (column_bits >> (n * 8 + (e & 1))) & 1u;
}

// The score of (query i, key) in log2 units, or -inf when the pair is masked. `acc` is <q_i, k>; key_kept is the
// key's bit of tile_key_bits (read only when the tile has a key mask).
// kHalo: band keys outside [0, S) (met only on tiles with check_range) are halo keys (halo_score_log2).
template <bool kHalo = false>
__device__ __forceinline__ float score_log2(const BandSideParams& p, const KeyTile& t, bool key_kept, float acc, int i,
                                            int key, int b, int h, int qb) {
  float s = acc * p.scale;
  if (!t.side) {
    if constexpr (kHalo) {
      if (t.check_range && (key < 0 || key >= p.S)) return halo_score_log2(p, s, i, key, b, h);
    }
    if (t.check_range && (key < i - p.left || key > i + p.right || key >= p.S)) return -INFINITY;
    if (p.band_key_mask != nullptr && !key_kept) return -INFINITY;
    if (p.band_bias != nullptr) s += __ldg(p.band_bias + (int64_t)h * p.band_width + (key - i + p.left));
  } else {
    if (t.check_range && key >= p.G) return -INFINITY;
    if (p.side_mask != nullptr && !key_kept) return -INFINITY;
    if (p.side_bias != nullptr) s += __ldg(p.side_bias + (int64_t)h * (2 * p.G + 1) + (key - qb + p.G));
  }
  // Not pinned with __fmul_rn like the lse epilogue: sm_90 SASS of every tile kernel (CUDA 13.0) multiplies by log2(e)
  // with a plain FMUL (never an FFMA into the exp2 argument), and intrinsics here (and on the scale / bias) grew the
  // kernels by 20-40 %.
  return s * kLog2e;
}

// ------------------------------------------------------------------------------------------------
// Global -> shared tile loads (cp.async, zero-filled past `limit`).
// ------------------------------------------------------------------------------------------------

// Rows row0 .. row0 + 63 of one (b, h) slice into a padded smem tile. Rows >= limit become zeros.
template <typename Traits>
__device__ __forceinline__ void load_tile_async(typename Traits::Element* smem, const void* base,
                                                const Strides& st, int b, int h, int row0, int limit,
                                                int tid) {
  using T = typename Traits::Element;
  const T* gbase = reinterpret_cast<const T*>(base) + (int64_t)b * st.batch + (int64_t)h * st.head;
#pragma unroll
  for (int it = 0; it < Traits::kChunksPerThread; ++it) {
    const int chunk = tid + it * Traits::kThreads;
    const int r = chunk / Traits::kRowChunks;
    const int c = (chunk % Traits::kRowChunks) * 8;
    const int row = row0 + r;
    const bool valid = row < limit;
    // An invalid row reads nothing; point it at the slice base so the address is still a legal one.
    const T* src = valid ? gbase + (int64_t)row * st.row + c : gbase;
    cp_async_16(smem + r * Traits::kSmemStride + c, src, valid);
  }
}

// kHalo: band key rows key0 .. key0 + 63 of one (b, h) slice, each read in place from x (0 <= j < S) or from
// the halo buffer (halo_row); rows outside [-halo_left, S + halo_right) become zeros. For the tiles that reach
// outside [0, S) (load_band_kv_async); no extended copy of k / v exists anywhere.
template <typename Traits>
__device__ __forceinline__ void load_halo_tile_async(typename Traits::Element* smem, const BandSideParams& p,
                                                     const void* x, const Strides& st, const void* halo,
                                                     const Strides& hst, int b, int h, int key0, int tid) {
  using T = typename Traits::Element;
  const T* xbase = reinterpret_cast<const T*>(x) + (int64_t)b * st.batch + (int64_t)h * st.head;
  const T* hbase = reinterpret_cast<const T*>(halo) + (int64_t)b * hst.batch + (int64_t)h * hst.head;
  // load_tile_async's chunk walk, written out again: a shared helper taking a lambda changed the plain kernels' SASS.
#pragma unroll
  for (int it = 0; it < Traits::kChunksPerThread; ++it) {
    const int chunk = tid + it * Traits::kThreads;
    const int r = chunk / Traits::kRowChunks;
    const int c = (chunk % Traits::kRowChunks) * 8;
    const int j = key0 + r;
    const int hrow = halo_row(p, j);
    const bool local = 0 <= j && j < p.S;
    const T* src = local ? xbase + (int64_t)j * st.row + c : hrow >= 0 ? hbase + (int64_t)hrow * hst.row + c : xbase;
    cp_async_16(smem + r * Traits::kSmemStride + c, src, local || hrow >= 0);
  }
}

// Rows r0 .. r0 + 63 of one (b, h) slice read in place by index: kIndexed side keys (kQuery = false: side key g is row
// side_index[b, g] of x, (B, S, H, D) k or v itself; slots >= G and indices outside [0, S) become zeros), or
// kQueryIndex query rows (kQuery: row i is token query_index[b / query_split, i] of batch row b / query_split of x,
// q or dout; rows >= S and tokens outside [0, query_tokens) become zeros). Any index value is safe. The index is read
// with plain loads before the copies are issued: such tiles are few per walk (side keys) or per CTA (query rows).
template <typename Traits, bool kQuery>
__device__ __forceinline__ void load_rows_by_index_async(typename Traits::Element* smem, const BandSideParams& p,
                                                         const void* x, const Strides& st, int b, int h, int r0,
                                                         int tid) {
  using T = typename Traits::Element;
  if constexpr (kQuery) b /= p.query_split;
  const T* xbase = reinterpret_cast<const T*>(x) + (int64_t)b * st.batch + (int64_t)h * st.head;
  const int64_t* index = kQuery ? p.query_index + (int64_t)b * p.query_index_stride
                                : p.side_index + (int64_t)b * p.side_index_stride;
#pragma unroll
  for (int it = 0; it < Traits::kChunksPerThread; ++it) {
    const int chunk = tid + it * Traits::kThreads;
    const int r = chunk / Traits::kRowChunks;
    const int c = (chunk % Traits::kRowChunks) * 8;
    const int g = r0 + r;
    const int64_t row = g < (kQuery ? p.S : p.G) ? __ldg(index + g) : -1;
    const bool valid = 0 <= row && row < (kQuery ? p.query_tokens : p.S);
    cp_async_16(smem + r * Traits::kSmemStride + c, valid ? xbase + row * st.row + c : xbase, valid);
  }
}

// The query-side rows row0 .. row0 + 63 of batch row b (q, or dout in the backward): the plain tile, or with
// kQueryIndex (Longformer's global rows, p.query_index) the tokens query_index[b / query_split, i] of batch row
// b / query_split of x, read in place (tokens outside [0, query_tokens) read zeros). The null test is always true in
// the kQueryIndex kernels (dispatch_flags runs them for a non-null index only) and keeps the plain load as a branch
// that never runs: without it ptxas (CUDA 13.0, sm_90) schedules the index loads so that the D = 128 kernels spill
// (forward 255 registers + 40 B of spill against 182 and none; dQ with dropout 216 B against none).
template <typename Traits, bool kQueryIndex>
__device__ __forceinline__ void load_query_tile_async(typename Traits::Element* smem, const BandSideParams& p,
                                                      const void* x, const Strides& st, int b, int h, int row0,
                                                      int tid) {
  if (kQueryIndex && p.query_index != nullptr) {
    load_rows_by_index_async<Traits, true>(smem, p, x, st, b, h, row0, tid);
  } else {
    load_tile_async<Traits>(smem, x, st, b, h, row0, p.S, tid);
  }
}

// K and V of side-key tile key0: rows of side_k / side_v, or (kIndexed) the tokens side_index names.
template <typename Traits, bool kIndexed>
__device__ __forceinline__ void load_side_kv_async(const BandSideParams& p, int key0, typename Traits::Element* sK,
                                                   typename Traits::Element* sV, int b, int h, int tid) {
  if constexpr (kIndexed) {
    load_rows_by_index_async<Traits, false>(sK, p, p.side_k, p.sk_st, b, h, key0, tid);
    load_rows_by_index_async<Traits, false>(sV, p, p.side_v, p.sv_st, b, h, key0, tid);
  } else {
    load_tile_async<Traits>(sK, p.side_k, p.sk_st, b, h, key0, p.G, tid);
    load_tile_async<Traits>(sV, p.side_v, p.sv_st, b, h, key0, p.G, tid);
  }
}

// K and V of band key tile key0 (kHalo: a tile reaching outside [0, S) takes the halo loader; the others, like
// every tile without a halo, the plain one).
template <typename Traits, bool kHalo>
__device__ __forceinline__ void load_band_kv_async(const BandSideParams& p, int key0, typename Traits::Element* sK,
                                                   typename Traits::Element* sV, int b, int h, int tid) {
  if constexpr (kHalo) {
    if (key0 < 0 || key0 + Traits::kBlockN > p.S) {
      load_halo_tile_async<Traits>(sK, p, p.k, p.k_st, p.halo_k, p.hk_st, b, h, key0, tid);
      load_halo_tile_async<Traits>(sV, p, p.v, p.v_st, p.halo_v, p.hv_st, b, h, key0, tid);
      return;
    }
  }
  load_tile_async<Traits>(sK, p.k, p.k_st, b, h, key0, p.S, tid);
  load_tile_async<Traits>(sV, p.v, p.v_st, b, h, key0, p.S, tid);
}

// ------------------------------------------------------------------------------------------------
// Warp GEMMs on mma.sync.m16n8k16. A warp computes 16 output rows.
// ------------------------------------------------------------------------------------------------

// acc[16 x N] += A[16 x K] * B[N x K]^T with A's 16 rows at sA and B's N rows at sB (both row-major
// over K in padded smem): the Q K^T / dO V^T / K Q^T / V dO^T products.
template <typename T, int K, int N, int LDS>
__device__ __forceinline__ void gemm_nt(float (&acc)[N / 8][4], const T* sA, const T* sB, int lane) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    uint32_t a[4];
    // matrices 0..3 = rows 0-7 / 8-15 x cols 0-7 / 8-15, in the a0..a3 order of the fragment.
    ldmatrix_x4(a, sA + (lane % 16) * LDS + kk * 16 + (lane / 16) * 8);
#pragma unroll
    for (int nn = 0; nn < N / 16; ++nn) {
      uint32_t bf[4];
      // non-transposed: (rows 0-7, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 0-7), (rows 8-15, k 8-15)
      ldmatrix_x4(bf, sB + (nn * 16 + (lane % 8) + (lane / 16) * 8) * LDS + kk * 16 + ((lane / 8) % 2) * 8);
      mma_16816<T>(acc[2 * nn], a, bf[0], bf[1]);
      mma_16816<T>(acc[2 * nn + 1], a, bf[2], bf[3]);
    }
  }
}

// acc[16 x K] += P[16 x N] * B[N x K] with P already in A-fragment registers (see acc_to_a) and B's N
// rows at sB, loaded transposed: the P V / P^T dO / dS K / dS^T Q products.
template <typename T, int N, int K, int LDS>
__device__ __forceinline__ void gemm_rs(float (&acc)[K / 8][4], const uint32_t (&pa)[N / 16][4], const T* sB,
                                        int lane) {
#pragma unroll
  for (int kk = 0; kk < N / 16; ++kk) {
#pragma unroll
    for (int nn = 0; nn < K / 16; ++nn) {
      uint32_t bf[4];
      // transposed: (rows 0-7, cols 0-7), (rows 8-15, cols 0-7), (rows 0-7, cols 8-15), (rows 8-15, 8-15)
      ldmatrix_x4_trans(bf, sB + (kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * LDS + nn * 16 + (lane / 16) * 8);
      mma_16816<T>(acc[2 * nn], pa[kk], bf[0], bf[1]);
      mma_16816<T>(acc[2 * nn + 1], pa[kk], bf[2], bf[3]);
    }
  }
}

// The C fragments of a 16 x N product are, two n-tiles at a time, exactly the A fragments of a 16 x 16
// k-step (same rows, columns 2*(lane%4) and +8): convert in registers, no shared-memory round trip.
template <typename T, int N>
__device__ __forceinline__ void acc_to_a(const float (&c)[N / 8][4], uint32_t (&a)[N / 16][4]) {
#pragma unroll
  for (int kk = 0; kk < N / 16; ++kk) {
    a[kk][0] = pack2<T>(c[2 * kk][0], c[2 * kk][1]);
    a[kk][1] = pack2<T>(c[2 * kk][2], c[2 * kk][3]);
    a[kk][2] = pack2<T>(c[2 * kk + 1][0], c[2 * kk + 1][1]);
    a[kk][3] = pack2<T>(c[2 * kk + 1][2], c[2 * kk + 1][3]);
  }
}

template <int N>
__device__ __forceinline__ void zero(float (&acc)[N][4]) {
#pragma unroll
  for (int n = 0; n < N; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
}

// Row / column of element e of n-tile n in a warp's C fragment (rows relative to the warp's 16).
__device__ __forceinline__ int frag_row(int lane, int e) { return lane / 4 + (e >= 2 ? 8 : 0); }
__device__ __forceinline__ int frag_col(int lane, int n, int e) { return n * 8 + (lane % 4) * 2 + (e & 1); }

// Store fragment row `half` (row lane / 4 + 8 * half of the warp's 16) of a 16 x D fp32 accumulator, times
// `sc`, as one row of T at dst.
template <typename T, int D>
__device__ __forceinline__ void store_frag_row(const float (&acc)[D / 8][4], int half, T* dst, int lane, float sc) {
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
    const int col = n * 8 + (lane % 4) * 2;
    *reinterpret_cast<uint32_t*>(dst + col) = pack2<T>(acc[n][2 * half] * sc, acc[n][2 * half + 1] * sc);
  }
}

// Store a warp's 16 x D fp32 accumulator as rows of T (row-major, `row_stride` elements apart), rows
// >= limit skipped. `scale` folds in the softmax scale (dK, dQ) or 1/l (out).
template <typename T, int D>
__device__ __forceinline__ void store_rows(const float (&acc)[D / 8][4], T* base, int64_t row_stride,
                                           int row0, int limit, int lane, float scale0, float scale1) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = row0 + lane / 4 + half * 8;
    if (row >= limit) continue;
    store_frag_row<T, D>(acc, half, base + (int64_t)row * row_stride, lane, half ? scale1 : scale0);
  }
}

// kHalo: the same for band key rows row0 .. row0 + 15 (local numbering): rows in [0, S) go to `local`
// (contiguous (B, S, H, D)), halo keys to `halo` (contiguous (B, halo_left + halo_right, H, D)), the rest nowhere.
template <typename T, int D>
__device__ __forceinline__ void store_band_key_rows(const float (&acc)[D / 8][4], const BandSideParams& p, void* local,
                                                    void* halo, int b, int h, int row0, int lane, float scale) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int j = row0 + lane / 4 + half * 8;
    int64_t row;
    T* base;
    if (0 <= j && j < p.S) {
      row = (int64_t)b * p.S + j;
      base = reinterpret_cast<T*>(local);
    } else {
      const int hrow = halo_row(p, j);
      if (hrow < 0) continue;
      row = (int64_t)b * (p.halo_left + p.halo_right) + hrow;
      base = reinterpret_cast<T*>(halo);
    }
    store_frag_row<T, D>(acc, half, base + (row * p.H + h) * D, lane, scale);
  }
}

// ------------------------------------------------------------------------------------------------
// Walking a query tile's key tiles.
// ------------------------------------------------------------------------------------------------

// The walk of query tile [m0, m0 + BM) without ranges: its band tiles, then every side-key tile.
template <int BM, int BN, bool kHalo = false>
__device__ __forceinline__ KeyTileWalk full_key_walk(const BandSideParams& p, int m0) {
  const BandKeyTiles<BM, BN, kHalo> band(p, m0);
  return {band.first, band.count, 0, (p.G + BN - 1) / BN};
}

// Resolve virtual tile t of a query tile's walk into its source and edge-ness.
template <int BM, int BN, bool kHalo>
__device__ __forceinline__ KeyTile key_tile_at(const BandSideParams& p, const KeyTileWalk& walk, int m0, int t) {
  KeyTile kt;
  kt.side = t >= walk.band_count;
  if (!kt.side) {
    kt.key0 = (walk.band_first + t) * BN;
    kt.check_range = !band_tile_is_interior<BM, BN, kHalo>(p, m0, kt.key0);
  } else {
    kt.key0 = (t - walk.band_count + walk.side_first) * BN;
    kt.check_range = kt.key0 + BN > p.G;
  }
  return kt;
}

// Issue the async loads of K and V tile t into buffer `buf`.
template <typename Traits, bool kHalo, bool kIndexed>
__device__ __forceinline__ void load_kv_async(const BandSideParams& p, const KeyTile& kt,
                                              typename Traits::Element* sK, typename Traits::Element* sV,
                                              int b, int h, int tid) {
  if (!kt.side) {
    load_band_kv_async<Traits, kHalo>(p, kt.key0, sK, sV, b, h, tid);
  } else {
    load_side_kv_async<Traits, kIndexed>(p, kt.key0, sK, sV, b, h, tid);
  }
}

// The software pipeline shared by the forward and dQ kernels: walk a query tile's key tiles (`walk`: band,
// then side) with K/V tile t + 1 loading into the other buffer while body(tile, sK_t, sV_t) runs on tile t.
// Anything else the caller loaded with cp.async before calling (its Q / dO tiles) joins the first
// group and has landed before the first body call. kMayBeEmpty: the walk may have no tile (per-row key
// ranges); without ranges every query's band holds itself, so it never is. kHalo: band tiles may lie in the halo.
// kIndexed: side tiles are the tokens p.side_index names (load_side_kv_async).
template <typename Traits, bool kMayBeEmpty, bool kHalo, bool kIndexed, typename Body>
__device__ __forceinline__ void walk_key_tiles(const BandSideParams& p, const KeyTileWalk& walk, int m0,
                                               typename Traits::Element* sK, typename Traits::Element* sV, int b,
                                               int h, int tid, Body&& body) {
  constexpr int BM = Traits::kBlockM, BN = Traits::kBlockN;
  const int n_tiles = walk.band_count + walk.side_count;
  if constexpr (kMayBeEmpty) {
    if (n_tiles == 0) {  // nothing to see: let the caller's loads land (never leave cp.async pending)
      cp_async_commit();
      cp_async_wait<0>();
      return;
    }
  }
  KeyTile cur = key_tile_at<BM, BN, kHalo>(p, walk, m0, 0);
  load_kv_async<Traits, kHalo, kIndexed>(p, cur, sK, sV, b, h, tid);
  cp_async_commit();
  for (int t = 0; t < n_tiles; ++t) {
    const int buf = t & 1;
    KeyTile next = cur;
    if (t + 1 < n_tiles) {
      // Buffer buf ^ 1 was last read in iteration t - 1, which ended with __syncthreads().
      next = key_tile_at<BM, BN, kHalo>(p, walk, m0, t + 1);
      load_kv_async<Traits, kHalo, kIndexed>(p, next, sK + (buf ^ 1) * Traits::kTileElems, sV + (buf ^ 1) * Traits::kTileElems,
                            b, h, tid);
      cp_async_commit();
      cp_async_wait<1>();  // everything but the tile just issued has landed
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    body(cur, sK + buf * Traits::kTileElems, sV + buf * Traits::kTileElems);
    cur = next;
    __syncthreads();  // all warps are done with buffer buf before iteration t + 1 refills it
  }
}

}  // namespace longattn
