// Per-row key ranges (packed variable-length batches, issue 14; the backend contract's key_ranges / side_ranges):
// query i of batch row b may attend band key j only if key_ranges[b, i, 0] <= j < key_ranges[b, i, 1], and
// side key g only if side_ranges[b, i, 0] <= g < side_ranges[b, i, 1] (either pointer may be null: no
// restriction of that kind). Only compiled into the kernels' kRanges = true instantiations. g is the side key's
// index in the call, also with kIndexed (Longformer's band pass: side key g is token side_index[b, g], g the slot).
//
// Correct for any values: a range only ever masks (the score becomes -inf, element by element), ranges are
// read at rows < S only, and every bound below is clamped to the window / [0, G) before it picks a tile.
// Fast for the monotone ranges of packed sequences (lo and hi non-decreasing along i):
//   - forward / dQ (rows = queries): a query tile visits only the key tiles that meet [min lo, max hi) over
//     its rows' non-empty ranges (intersected with the window, or [0, G)); a warp tests elements only on the
//     tiles not inside every one of its rows' ranges (the edges of a sequence).
//   - dK/dV (rows = keys): a key tile visits only the query tiles from the first to the last holding a row
//     whose range meets it (one scan of those rows' ranges; contiguous for monotone ranges); elements are
//     tested only on query tiles where some row's range does not hold the whole key tile.
#pragma once

#include <climits>

#include "band_side/tile_ops.h"

namespace longattn {

struct RowRange {
  int lo, hi;  // keys [lo, hi); lo >= hi is an empty range
};

// Row i's range from a (B, S, 2) int32 tensor: two 4-byte loads (a contiguous view need not be 8-byte aligned).
__device__ __forceinline__ RowRange load_range(const int32_t* ranges, const BandSideParams& p, int b, int i) {
  const int32_t* r = ranges + ((int64_t)b * p.S + i) * 2;
  return {__ldg(r), __ldg(r + 1)};
}

__device__ __forceinline__ bool range_holds(const RowRange& r, int key) { return r.lo <= key && key < r.hi; }

// CTA-wide (min a, max b, min c, max d), every thread getting the results. One __syncthreads; the
// scratch is only ever written once per kernel (each kernel calls this at most once).
template <int kWarps>
__device__ __forceinline__ void cta_min_max2(int& a, int& b, int& c, int& d) {
  __shared__ int red[kWarps][4];
#pragma unroll
  for (int off = 16; off > 0; off /= 2) {
    a = min(a, __shfl_xor_sync(0xffffffffu, a, off));
    b = max(b, __shfl_xor_sync(0xffffffffu, b, off));
    c = min(c, __shfl_xor_sync(0xffffffffu, c, off));
    d = max(d, __shfl_xor_sync(0xffffffffu, d, off));
  }
  const int warp = threadIdx.x / 32;
  if (threadIdx.x % 32 == 0) {
    red[warp][0] = a;
    red[warp][1] = b;
    red[warp][2] = c;
    red[warp][3] = d;
  }
  __syncthreads();
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    a = min(a, red[w][0]);
    b = max(b, red[w][1]);
    c = min(c, red[w][2]);
    d = max(d, red[w][3]);
  }
}

__device__ __forceinline__ int warp_max(int x) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) x = max(x, __shfl_xor_sync(0xffffffffu, x, off));
  return x;
}
__device__ __forceinline__ int warp_min(int x) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) x = min(x, __shfl_xor_sync(0xffffffffu, x, off));
  return x;
}

// One kind of range (band or side) over a thread's two query rows: union of the non-empty ranges (for the
// tile walk) and intersection of all ranges (for the element test), rows >= S left out of both.
struct RangeFold {
  int union_lo = INT_MAX, union_hi = INT_MIN, inner_lo = INT_MIN, inner_hi = INT_MAX;
  __device__ void add(const int32_t* ranges, const BandSideParams& p, int b, int i) {
    if (ranges == nullptr || i >= p.S) return;
    const RowRange r = load_range(ranges, p, b, i);
    inner_lo = max(inner_lo, r.lo);
    inner_hi = min(inner_hi, r.hi);
    if (r.lo < r.hi) {
      union_lo = min(union_lo, r.lo);
      union_hi = max(union_hi, r.hi);
    }
  }
};

// Tile span [first, first + count) of the keys [lo, hi] (inclusive) meeting the union [ulo, uhi).
template <int BN>
__device__ __forceinline__ void clip_tiles(int lo, int hi, int ulo, int uhi, int& first, int& count) {
  if (ulo >= uhi) {  // no row has a non-empty range (uhi may be INT_MIN: no uhi - 1)
    first = count = 0;
    return;
  }
  lo = max(lo, ulo);
  hi = min(hi, uhi - 1);
  first = lo / BN;  // lo >= 0 whenever it is used
  count = lo > hi ? 0 : hi / BN - first + 1;
}

// Which of a warp fragment's elements are inside their row's range, as a 32-bit mask in the layout of the
// dropout keep bits (band_side/dropout.h): bit 4 * n + e for element e of n-tile n. Built before a tile's
// products while few registers are live, so the score loop then costs one bit test per element.
// Rows = queries (forward, dQ): row rr[e >> 1], key key0 + frag_col(lane, n, e).
template <int N>
__device__ __forceinline__ uint32_t range_mask_query_rows(const RowRange (&rr)[2], int key0, int lane) {
  uint32_t mask = 0;
#pragma unroll
  for (int n = 0; n < N / 8; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) mask |= (uint32_t)range_holds(rr[e >> 1], key0 + frag_col(lane, n, e)) << (4 * n + e);
  }
  return mask;
}

// Rows = keys (dK/dV): key e >= 2 ? k1 : k0, query column il = frag_col(lane, n, e) with range [lo[il], hi[il]).
template <int N>
__device__ __forceinline__ uint32_t range_mask_key_rows(const int* lo, const int* hi, int k0, int k1, int lane) {
  uint32_t mask = 0;
#pragma unroll
  for (int n = 0; n < N / 8; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int il = frag_col(lane, n, e), key = e >= 2 ? k1 : k0;
      mask |= (uint32_t)(lo[il] <= key && key < hi[il]) << (4 * n + e);
    }
  }
  return mask;
}

__device__ __forceinline__ bool mask_bit(uint32_t mask, int n, int e) { return (mask >> (4 * n + e)) & 1u; }

// Per-warp state of the forward / dQ kernels with ranges: the keys every one of the warp's rows may see, by
// kind. A tile inside them needs no element test.
struct QueryRanges {
  int band_lo, band_hi, side_lo, side_hi;

  // The tile's range_mask_query_rows (all ones when the tile is inside every row's range: no row is read).
  // A row >= S gets an empty range: its output is never stored. Warp-uniform branch.
  template <int BN>
  __device__ __forceinline__ uint32_t tile_mask(const BandSideParams& p, bool side, int key0, int b, int i0, int i1,
                                                int lane) const {
    const int32_t* ranges = side ? p.side_ranges : p.key_ranges;
    const int lo = side ? side_lo : band_lo, hi = side ? side_hi : band_hi;
    if (ranges == nullptr || (lo <= key0 && key0 + BN <= hi)) return ~0u;
    const RowRange rr[2] = {i0 < p.S ? load_range(ranges, p, b, i0) : RowRange{0, 0},
                            i1 < p.S ? load_range(ranges, p, b, i1) : RowRange{0, 0}};
    return range_mask_query_rows<BN>(rr, key0, lane);
  }
};

// The walk of query tile [m0, m0 + BM) narrowed by its rows' ranges, and the warp's inner ranges. Every
// thread of the CTA must call it (one __syncthreads). i0, i1: this thread's two rows.
template <typename Traits>
__device__ __forceinline__ QueryRanges query_tile_ranges(const BandSideParams& p, int b, int m0, int i0, int i1,
                                                         KeyTileWalk& walk) {
  constexpr int BM = Traits::kBlockM, BN = Traits::kBlockN;
  RangeFold band, side;
  band.add(p.key_ranges, p, b, i0);
  band.add(p.key_ranges, p, b, i1);
  side.add(p.side_ranges, p, b, i0);
  side.add(p.side_ranges, p, b, i1);
  const QueryRanges q{warp_max(band.inner_lo), warp_min(band.inner_hi), warp_max(side.inner_lo),
                      warp_min(side.inner_hi)};
  cta_min_max2<Traits::kWarps>(band.union_lo, band.union_hi, side.union_lo, side.union_hi);
  // The window's keys (as BandKeyTiles), then the union of the rows' ranges.
  const int win_lo = max(0, m0 - p.left), win_hi = min(p.S - 1, min(p.S - 1, m0 + BM - 1) + p.right);
  if (p.key_ranges != nullptr) {
    clip_tiles<BN>(win_lo, win_hi, band.union_lo, band.union_hi, walk.band_first, walk.band_count);
  } else {
    walk.band_first = win_lo / BN;
    walk.band_count = win_hi / BN - walk.band_first + 1;
  }
  if (p.side_only) walk.band_count = 0;  // Longformer's global rows: side keys only (dispatch_flags sends them here)
  if (p.side_ranges != nullptr) {
    clip_tiles<BN>(0, p.G - 1, side.union_lo, side.union_hi, walk.side_first, walk.side_count);
  } else {
    walk.side_first = 0;
    walk.side_count = (p.G + BN - 1) / BN;
  }
  return q;
}

// The walk of query tile [m0, m0 + BM) for the forward / dQ kernels: kRanges, narrowed by its rows' ranges
// (and `ranges` filled); else every tile of its band (kHalo: halo tiles included) and every side tile
// (full_key_walk), as without ranges. Ranges and halo keys are never combined (the API refuses it).
template <typename Traits, bool kRanges, bool kHalo = false>
__device__ __forceinline__ KeyTileWalk query_tile_walk(const BandSideParams& p, int b, int m0, int i0, int i1,
                                                       QueryRanges& ranges) {
  static_assert(!(kRanges && kHalo), "per-row key ranges are not combined with halo keys");
  KeyTileWalk walk;
  if constexpr (kRanges) {
    ranges = query_tile_ranges<Traits>(p, b, m0, i0, i1, walk);
  } else {
    walk = full_key_walk<Traits::kBlockM, Traits::kBlockN, kHalo>(p, m0);
  }
  return walk;
}

// dK/dV: narrow a key tile's query tiles [q_first, q_first + q_count) to those from the first to the last
// holding a row (< S) whose range meets the tile's keys [key0, min(key0 + BN, limit)) (limit: S or G). Every
// thread must call it (one __syncthreads); ranges == nullptr leaves the span as it is.
template <typename Traits>
__device__ __forceinline__ void narrow_query_tiles(const BandSideParams& p, const int32_t* ranges, int b, int key0,
                                                   int limit, int& q_first, int& q_count) {
  constexpr int BM = Traits::kBlockM;
  if (ranges == nullptr) return;
  const int key_end = min(key0 + Traits::kBlockN, limit);
  const int row_end = min(p.S, (q_first + q_count) * BM);
  int first = INT_MAX, last = -1, unused_min = 0, unused_max = 0;
  for (int i = q_first * BM + threadIdx.x; i < row_end; i += Traits::kThreads) {
    const RowRange r = load_range(ranges, p, b, i);
    if (max(r.lo, key0) < min(r.hi, key_end)) {
      first = min(first, i);
      last = i;  // rows ascend along this thread's stride
    }
  }
  cta_min_max2<Traits::kWarps>(first, last, unused_min, unused_max);
  if (last < 0) {
    q_count = 0;
    return;
  }
  q_first = first / BM;
  q_count = last / BM - q_first + 1;
}

}  // namespace longattn
