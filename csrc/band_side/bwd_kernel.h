// Backward kernels of the band + side keys primitive. No atomics anywhere, so results are bitwise
// reproducible:
//
//   band_side_bwd_delta_kernel   delta = rowsum(dO * O) per query row (float32, (B, H, S)); also converts 16-bit
//                                bias tables to float32 (bias_tables.h) and zeroes the bias partials (grid-stride),
//                                which the dK/dV CTAs then accumulate into.
//   band_side_bwd_dq_kernel      one CTA per query tile walks the same key tiles as the forward
//                                (walk_key_tiles) and accumulates dQ = scale * dS K in registers.
//   band_side_bwd_dkdv_kernel    one CTA per key tile: a band key tile iterates over the query tiles that
//                                see it and writes its dK, dV rows directly; a side-key tile iterates over
//                                one chunk of query tiles and writes float32 partials, or for Longformer's
//                                global rows (side_only: one chunk) its rows directly. Bias-table gradients: each
//                                CTA reduces its dS tile by table entry in shared memory, one thread per entry
//                                in a fixed order, into its own row of a partial buffer.
//   band_side_bwd_finish_kernel  the partials summed in a fixed order and written in the outputs' dtypes (side
//                                keys over chunks, the bias tables over key CTAs).
//
// P is recomputed from the saved lse with the forward's score_log2, so masked entries (score -inf) and
// rows with no key (lse +inf) give P = 0 and hence zero gradients.
//
// kDropout (Z = keep / (1 - p), the forward's bits regenerated from the same counters, band_side/dropout.h):
// dV = (P Z)^T dO and dS = P (Z dP - delta), dP = dO V^T; delta = rowsum(dO * O) is unchanged.
//
// kRanges (per-row key ranges, band_side/ranges.h): dQ walks the forward's narrowed key tiles; a dK/dV CTA
// visits only the query tiles from the first to the last whose rows' ranges meet its key tile. Pairs outside a
// row's range get score -inf, hence P = 0 and no gradient.
//
// kHalo (halo keys, never with kRanges): dQ walks the forward's key tiles, halo tiles included; the dK/dV grid's
// band CTAs cover the key tiles [band_tile0, band_tile0 + n_band_tiles) of the keys some query's window reaches in
// [-halo_left, S + halo_right), and a CTA's key rows outside [0, S) write dhalo_k / dhalo_v. With kDropout the bits
// are the forward's: rows and band keys shifted by drop_offset (dropout.h).
//
// kIndexed (Longformer's band pass, never with kHalo; with or without kRanges): the side tiles are the tokens
// side_index names (load_side_kv_async); the side keys' dK/dV partials go to the finish kernel below.
//
// dlse (the gradient of the lse output): dS = P (dP - delta + dlse), i.e. delta - dlse in place of delta,
// computed once by the delta kernel; nothing else changes.
//
// Longformer's global rows: side_only (no band tile walked, no band CTA in the dK/dV grid: dk / dv of the band keys
// are not written), lse_split (the delta kernel copies lse row b / lse_split, every key split's merged statistics,
// into the lse_in of batch row b: the other kernels read lse as always), dside_k_into (the side keys' dK/dV added into
// the split keys' rows by the dK/dV epilogue: one query chunk) and kQueryIndex (query_index: q, dout and out rows read
// in place at the slots' tokens, by the delta kernel and the Q / dO tile loads of the dQ and dK/dV kernels,
// load_query_tile_async).
#pragma once

#include "band_side/bias_tables.h"
#include "band_side/dropout.h"
#include "band_side/launch.h"
#include "band_side/ranges.h"
#include "band_side/tile_ops.h"

namespace longattn {

// ------------------------------------------------------------------------------------------------
// delta = rowsum(dO * O) (- dlse where given and the row's lse < +inf): 8 lanes per (b, s, h) row. With lse_split it
// also writes the row's lse_in (see there). kQueryIndex (p.query_index, Longformer's global rows): dO and O of row
// (b, s) are token query_index[b / query_split, s] of batch row b / query_split; a token outside [0, query_tokens)
// gives delta = 0 (dlse ignored), so the row's dS, hence its dq and key gradients, are 0 whatever its lse.
// ------------------------------------------------------------------------------------------------
__host__ __device__ inline int side_ctas_per_bh(const BandSideParams& p) {
  return ((p.G + 63) / 64) * p.side_chunks;  // the dK/dV grid's side CTAs (64-key tiles x chunks)
}

// Zeros x[0, n) with the whole grid (grid-stride).
__device__ __forceinline__ void grid_zero_fill(float* x, int64_t n) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) x[i] = 0.f;
}

// <x, y> in float32 of two 16-byte chunks (8 T's each), pair by pair.
template <typename T>
__device__ __forceinline__ float chunk_dot(const uint4& x, const uint4& y) {
  const uint32_t xs[4] = {x.x, x.y, x.z, x.w}, ys[4] = {y.x, y.y, y.z, y.w};
  float acc = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 a = unpack2<T>(xs[i]), b = unpack2<T>(ys[i]);
    acc = fmaf(a.x, b.x, acc);
    acc = fmaf(a.y, b.y, acc);
  }
  return acc;
}

// Warp `warp` of the delta launch (counted from this pass's first): rows [warp, warp + 1) * kDeltaRowsPerWarp of
// (B, S, H) (b slowest, h fastest), kDeltaLanesPerRow lanes a row (launch.h). Lane l of a row's group reads 16-byte
// chunks l, l + 8, ... of the row's D / 8 (D is 32, 64 or 128) from dO and O: the backward's dout and out are
// loadable() (band_side_api.cpp), their base and row starts 16-byte aligned. The delta kernel's body, which
// Longformer's fused backward (longformer/fused_bwd.h) runs for the band pass's and the global rows' rows in one
// launch.
//
// Why 8 lanes a row and 16-byte loads: with one warp a row and one 2-byte element a lane, the H200 ran the local op's
// delta (S = 16384, H = 12, D = 64, bf16: 50 MB read, ~11 us at the H200's bandwidth) in 72 us, bound by instructions
// (64-bit row decomposition per row, a runtime-D loop of dependent 2-byte loads) rather than by bytes.
template <typename T, bool kQueryIndex>
__device__ __forceinline__ void band_side_bwd_delta_rows(const BandSideParams& p, int64_t warp) {
  const int lane = threadIdx.x % 32, part = lane % kDeltaLanesPerRow;
  const int64_t row = warp * kDeltaRowsPerWarp + lane / kDeltaLanesPerRow;
  const bool in_rows = row < (int64_t)p.B * p.S * p.H;  // uniform over the row's lanes
  const int h = row % p.H;
  const int s = (row / p.H) % p.S;
  const int b = row / ((int64_t)p.H * p.S);
  int64_t src_b = b, src_s = s;  // where the row's dO and O are
  bool real = in_rows;
  if constexpr (kQueryIndex) {
    src_b = b / p.query_split;
    if (in_rows) src_s = p.query_index[src_b * p.query_index_stride + s];
    real = in_rows && 0 <= src_s && src_s < p.query_tokens;  // uniform over the row's lanes
  }
  float acc = 0.f;
  if (real) {
    const T* dO = reinterpret_cast<const T*>(p.dout) + src_b * p.do_st.batch + src_s * p.do_st.row + h * p.do_st.head;
    const T* O = reinterpret_cast<const T*>(p.o) + src_b * p.o_st.batch + src_s * p.o_st.row + h * p.o_st.head;
    // D <= 128 (band_side_api.cpp checks 32, 64 or 128): at most 2 chunks a lane, unrolled so the loads issue together.
    constexpr int kMaxChunks = 128 / 8 / kDeltaLanesPerRow;
#pragma unroll
    for (int i = 0; i < kMaxChunks; ++i) {
      const int c = part + i * kDeltaLanesPerRow;
      if (c < p.D / 8) {
        const uint4 dO_chunk = __ldg(reinterpret_cast<const uint4*>(dO) + c);
        acc += chunk_dot<T>(dO_chunk, __ldg(reinterpret_cast<const uint4*>(O) + c));
      }
    }
  }
  // The row's lanes are aligned groups of 8: xor offsets below 8 stay inside the group.
#pragma unroll
  for (int off = kDeltaLanesPerRow / 2; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (in_rows && part == 0) {
    const int64_t at = ((int64_t)b * p.H + h) * p.S + s;
    // lse_split (Longformer's key splits, never with dlse): batch row b's lse is row b / lse_split of the merged
    // statistics, copied here into the (B, H, S) lse_in the dQ and dK/dV kernels then read as always.
    if (p.lse_split > 1) p.lse_expanded[at] = p.lse_merged[((int64_t)(b / p.lse_split) * p.H + h) * p.S + s];
    // A row with lse = +inf has P = 0: its dlse (any value, NaN included) must not reach 0 * (dP - delta).
    if (p.dlse != nullptr && real && p.lse_in[at] < INFINITY) acc -= p.dlse[at];
    p.delta[at] = acc;
  }
}

template <typename T, bool kQueryIndex>
__global__ void band_side_bwd_delta_kernel(const BandSideParams p) {
  // 16-bit bias tables into the float32 workspaces the dQ and dK/dV kernels read (stream order: after this kernel), so
  // the backward has no conversion launch of its own.
  convert_bias_tables(p);
  // The bias partials the dK/dV CTAs accumulate into, zeroed here (stream order puts this before the dK/dV kernel):
  // no zero-fill launch, and no zeroing loop in the dK/dV kernel, whose D = 128 instantiations sit at 255 registers.
  if (p.dband_bias_partial != nullptr)
    grid_zero_fill(p.dband_bias_partial, (int64_t)p.B * p.H * p.n_band_tiles * p.band_width);
  if (p.dside_bias_partial != nullptr)
    grid_zero_fill(p.dside_bias_partial, (int64_t)p.B * p.H * side_ctas_per_bh(p) * (2 * p.G + 1));
  band_side_bwd_delta_rows<T, kQueryIndex>(p, (int64_t)blockIdx.x * kDeltaWarpsPerCta + threadIdx.x / 32);
}

// The lse in log2 units, +inf for rows past the end (so their P is 0 with no extra test).
__device__ __forceinline__ float lse_log2(const BandSideParams& p, int b, int h, int i) {
  // Rounding pinned (__fmul_rn is never contracted into the exp2 argument's subtraction): this is inlined into every
  // dQ / dK/dV instantiation and Longformer's fused dQ, whose P must agree bitwise (see the forward's lse epilogue).
  return i < p.S ? __fmul_rn(p.lse_in[((int64_t)b * p.H + h) * p.S + i], kLog2e) : INFINITY;
}
__device__ __forceinline__ float delta_at(const BandSideParams& p, int b, int h, int i) {
  return i < p.S ? p.delta[((int64_t)b * p.H + h) * p.S + i] : 0.f;
}

// ------------------------------------------------------------------------------------------------
// dQ
// ------------------------------------------------------------------------------------------------
// The dQ of one query tile: rows [m0, m0 + 64) of batch row b, head h, in the dynamic shared memory `smem_raw`
// (Traits::kBwdDqSmem bytes). The dQ kernel's whole body, which Longformer's fused backward (longformer/fused_bwd.h)
// runs at its own tile coordinates for the band pass and the global rows' key splits.
template <typename Traits, bool kDropout, bool kRanges, bool kHalo, bool kIndexed, bool kQueryIndex>
__device__ __forceinline__ void band_side_bwd_dq_tile(const BandSideParams& p, int m0, int b, int h,
                                                      unsigned char* smem_raw) {
  static_assert(!(kHalo && kRanges), "halo keys come without ranges");
  static_assert(!(kIndexed && kHalo), "indexed side keys come without halo keys");
  static_assert(!kQueryIndex || (kRanges && !kIndexed), "indexed query rows: side_only, run by the kRanges walk");
  using T = typename Traits::Element;
  constexpr int D = Traits::kHeadDim, BN = Traits::kBlockN, LDS = Traits::kSmemStride;
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sdO = sQ + Traits::kTileElems;
  T* sK = sdO + Traits::kTileElems;     // 2 buffers
  T* sV = sK + 2 * Traits::kTileElems;  // 2 buffers

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;

  load_query_tile_async<Traits, kQueryIndex>(sQ, p, p.q, p.q_st, b, h, m0, tid);
  load_query_tile_async<Traits, kQueryIndex>(sdO, p, p.dout, p.do_st, b, h, m0, tid);

  const int i0 = m0 + warp * 16 + lane / 4, i1 = i0 + 8;
  const int qb[2] = {clamp_query_block(p, b, i0), clamp_query_block(p, b, i1)};
  const float lse2[2] = {lse_log2(p, b, h, i0), lse_log2(p, b, h, i1)};
  const float delta[2] = {delta_at(p, b, h, i0), delta_at(p, b, h, i1)};

  float acc_dq[D / 8][4];
  zero(acc_dq);
  DropoutCtx drop{};
  if constexpr (kDropout) drop = dropout_ctx<kHalo>(p, b, h);
  QueryRanges ranges{};
  const KeyTileWalk walk = query_tile_walk<Traits, kRanges, kHalo>(p, b, m0, i0, i1, ranges);

  walk_key_tiles<Traits, kRanges, kHalo, kIndexed>(p, walk, m0, sK, sV, b, h, tid, [&](const KeyTile& kt, const T* sKt,
                                                                              const T* sVt) {
    // The keep bits depend on indices only: drawn before the products, while few registers are live.
    uint32_t keep = 0;
    if constexpr (kDropout) keep = keep_mask_query_rows<BN>(drop, kt.side, kt.key0, i0, i1, lane);
    uint32_t in_range = ~0u;
    if constexpr (kRanges) in_range = ranges.tile_mask<BN>(p, kt.side, kt.key0, b, i0, i1, lane);
    float s[BN / 8][4], dp[BN / 8][4];
    zero(s);
    zero(dp);
    gemm_nt<T, D, BN, LDS>(s, sQ + warp * 16 * LDS, sKt, lane);
    gemm_nt<T, D, BN, LDS>(dp, sdO + warp * 16 * LDS, sVt, lane);
    if constexpr (kDropout) {
#pragma unroll
      for (int n = 0; n < BN / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) dp[n][e] *= keep_scale(keep, n, e, p.drop_scale);  // Z dP
      }
    }
    const uint64_t key_bits = column_key_bits(p, kt, b, lane);
#pragma unroll
    for (int n = 0; n < BN / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        float sc = score_log2<kHalo>(p, kt, column_key_kept(key_bits, n, e), s[n][e], r ? i1 : i0,
                                     kt.key0 + frag_col(lane, n, e), b, h, qb[r]);
        if constexpr (kRanges) {
          if (!mask_bit(in_range, n, e)) sc = -INFINITY;
        }
        const float prob = exp2f(sc - lse2[r]);
        s[n][e] = prob * (dp[n][e] - delta[r]);  // dS, the gradient of the score
      }
    }
    uint32_t pa[BN / 16][4];
    acc_to_a<T, BN>(s, pa);
    gemm_rs<T, BN, D, LDS>(acc_dq, pa, sKt, lane);
  });

  T* dq = reinterpret_cast<T*>(p.dq) + ((int64_t)b * p.S * p.H + h) * D;
  store_rows<T, D>(acc_dq, dq, (int64_t)p.H * D, m0 + warp * 16, p.S, lane, p.scale, p.scale);
}

template <typename Traits, bool kDropout, bool kRanges, bool kHalo, bool kIndexed, bool kQueryIndex>
__global__ void __launch_bounds__(Traits::kThreads) band_side_bwd_dq_kernel(const BandSideParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  band_side_bwd_dq_tile<Traits, kDropout, kRanges, kHalo, kIndexed, kQueryIndex>(p, blockIdx.x * Traits::kBlockM,
                                                                                 blockIdx.y, blockIdx.z, smem_raw);
}

// ------------------------------------------------------------------------------------------------
// Bias-table gradients from one dS^T tile in shared memory (sDs[key_local][query_local]).
// Each table entry touched by the tile is owned by one thread, which sums its elements in a fixed order
// and adds the sum into this CTA's private partial row: deterministic and race-free (the row is only
// touched by this CTA, and consecutive tiles are separated by __syncthreads).
// ------------------------------------------------------------------------------------------------
template <typename Traits>
__device__ __forceinline__ void band_bias_grad_tile(const BandSideParams& p, const float* sDs, int key0, int q0,
                                                    float* partial_row, int tid) {
  constexpr int BM = Traits::kBlockM, BN = Traits::kBlockN, LD = Traits::kDsStride;
  static_assert(BM - 1 + BN <= Traits::kThreads, "one pass over the tile's diagonals");
  // Entry t = key - i + left is constant along a diagonal d = key_local - query_local.
  const int d = tid - (BM - 1);
  if (d > BN - 1) return;
  const int t = p.left + key0 - q0 + d;
  if (t < 0 || t >= p.band_width) return;
  float acc = 0.f;
  const int il_lo = max(0, -d), il_hi = min(BM, BN - d);
  for (int il = il_lo; il < il_hi; ++il) acc += sDs[(il + d) * LD + il];
  partial_row[t] += acc;
}

template <typename Traits>
__device__ __forceinline__ void side_bias_grad_tile(const BandSideParams& p, const float* sDs, const int* sQb,
                                                    int key0, int q0, float* partial_row, int tid) {
  constexpr int BN = Traits::kBlockN, LD = Traits::kDsStride;
  const int nq = min(Traits::kBlockM, p.S - q0);
  int qb_min = p.G, qb_max = -1;
  for (int il = 0; il < nq; ++il) {
    qb_min = min(qb_min, sQb[il]);
    qb_max = max(qb_max, sQb[il]);
  }
  // Entry u = g - qb + G (qb clamped to [-1, G-1], so u in [1, 2G]); for a given u and query there is at
  // most one g, so each u is a plain fixed-order sum over the tile's queries.
  const int u_lo = key0 - qb_max + p.G;
  const int u_hi = min(key0 + BN, p.G) - 1 - qb_min + p.G;
  for (int u = u_lo + tid; u <= u_hi; u += Traits::kThreads) {
    float acc = 0.f;
    for (int il = 0; il < nq; ++il) {
      const int kl = u - p.G + sQb[il] - key0;
      if (kl >= 0 && kl < BN) acc += sDs[kl * LD + il];
    }
    partial_row[u] += acc;
  }
}

// ------------------------------------------------------------------------------------------------
// Where a side key's final dK / dV row goes (the dK/dV epilogue with one chunk, or the finish kernel with partials):
//   - kIndexed band pass (side_index): row side_index[b, g] of dk / dv (contiguous (B, S, H, D)), added: the band CTAs
//     leave it at exactly 0 in the Longformer op (global tokens are never band keys), so the add is exact; the kept
//     slots of a batch row name distinct rows (Longformer's do); indices outside [0, S) get nothing.
//   - global rows (dside_k_into): row (b % into_split) * G + g of batch row b / into_split of dside_*_into, added;
//     rows >= into_rows (the last split's padding) get nothing.
//   - otherwise row g of dside_k / dside_v (contiguous (B, G, H, D)), stored (every row, masked ones get 0).
// Added destinations skip the slots side_mask drops (no gradient). Distinct (b, g) -> distinct rows: every element
// has one writer, so no atomics are needed.
// ------------------------------------------------------------------------------------------------
template <typename T>
struct SideKeyRows {
  T* k;
  T* v;
  bool add;  // add into the row (else store)
};

template <typename T>
__device__ __forceinline__ bool side_key_rows(const BandSideParams& p, int b, int g, int h, SideKeyRows<T>& r) {
  r.add = p.side_index != nullptr || p.dside_k_into != nullptr;
  if (!r.add) {
    const int64_t at = (((int64_t)b * p.G + g) * p.H + h) * p.D;
    r.k = reinterpret_cast<T*>(p.dside_k) + at;
    r.v = reinterpret_cast<T*>(p.dside_v) + at;
    return true;
  }
  if (p.side_mask != nullptr && !p.side_mask[(int64_t)b * p.G + g]) return false;
  if (p.side_index != nullptr) {
    const int64_t row = p.side_index[(int64_t)b * p.side_index_stride + g];
    if (row < 0 || row >= p.S) return false;
    const int64_t at = (((int64_t)b * p.S + row) * p.H + h) * p.D;
    r.k = reinterpret_cast<T*>(p.dk) + at;
    r.v = reinterpret_cast<T*>(p.dv) + at;
    return true;
  }
  const int64_t row = (int64_t)(b % p.into_split) * p.G + g, kb = b / p.into_split;
  if (row >= p.into_rows) return false;
  const Strides& ks = p.dsk_into_st;
  const Strides& vs = p.dsv_into_st;
  r.k = reinterpret_cast<T*>(p.dside_k_into) + kb * ks.batch + row * ks.row + h * ks.head;
  r.v = reinterpret_cast<T*>(p.dside_v_into) + kb * vs.batch + row * vs.row + h * vs.head;
  return true;
}

// Two adjacent elements (x, y) stored at dst, or added in float32 to what is there (one rounding to T). Element pairs:
// the API checks the destinations' base and strides keep them 4-byte aligned.
template <typename T>
__device__ __forceinline__ void put_pair(T* dst, float x, float y, bool add) {
  if (add) {
    x = __fadd_rn(to_float(dst[0]), x);
    y = __fadd_rn(to_float(dst[1]), y);
  }
  *reinterpret_cast<uint32_t*>(dst) = pack2<T>(x, y);
}

// Row `half` of a thread's two dK/dV accumulator rows (acc[n][2 * half], acc[n][2 * half + 1] are columns n * 8 +
// (lane % 4) * 2 and + 1), times scale, added into the row at dst in float32 (one rounding to T, as put_pair) or
// stored. The loads of up to 8 pairs are issued before any of their stores: with put_pair's load-add-store per pair
// the compiler cannot move a load above the previous pair's store (it cannot rule out aliasing), so every pair was a
// full round trip to memory (sm_90 SASS, CUDA 13.0: 32 serialized read-modify-writes per thread in the global rows'
// epilogue, whose launch took 199 us for one global token on the H200 at dffeee2, S = 16384). A thread's pairs are
// distinct elements of one row, so the order of their loads and stores changes nothing.
template <typename T, int D>
__device__ __forceinline__ void put_acc_row(T* dst, const float (&acc)[D / 8][4], int half, float scale, int lane,
                                            bool add) {
  constexpr int kBatch = D / 8 < 8 ? D / 8 : 8;
  T* const row = dst + (lane % 4) * 2;
#pragma unroll
  for (int n0 = 0; n0 < D / 8; n0 += kBatch) {
    uint32_t old[kBatch];
    if (add) {
#pragma unroll
      for (int i = 0; i < kBatch; ++i) old[i] = *reinterpret_cast<const uint32_t*>(row + (n0 + i) * 8);
    }
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      float x = __fmul_rn(acc[n0 + i][2 * half], scale), y = __fmul_rn(acc[n0 + i][2 * half + 1], scale);
      if (add) {
        const float2 o = unpack2<T>(old[i]);
        x = __fadd_rn(o.x, x);
        y = __fadd_rn(o.y, y);
      }
      *reinterpret_cast<uint32_t*>(row + (n0 + i) * 8) = pack2<T>(x, y);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// dK, dV (band key tiles and side-key tiles x query chunks)
// ------------------------------------------------------------------------------------------------
// The dK/dV of one key CTA: band key tile or (side-key tile, query chunk) number `cta` of the grid's x (band tiles
// first) for batch row b, head h, in the dynamic shared memory `smem_raw` (Traits::kBwdDkvSmem bytes, or
// kBwdDkvRangesSmem with kRanges). The dK/dV kernel's whole body, which Longformer's fused backward runs at its own
// coordinates for the global rows.
template <typename Traits, bool kDropout, bool kRanges, bool kHalo, bool kIndexed, bool kQueryIndex>
__device__ __forceinline__ void band_side_bwd_dkdv_tile(const BandSideParams& p, int cta, int b, int h,
                                                        unsigned char* smem_raw) {
  static_assert(!(kHalo && kRanges), "halo keys come without ranges");
  static_assert(!(kIndexed && kHalo), "indexed side keys come without halo keys");
  static_assert(!kQueryIndex || (kRanges && !kIndexed), "indexed query rows: side_only, run by the kRanges walk");
  using T = typename Traits::Element;
  constexpr int D = Traits::kHeadDim, BM = Traits::kBlockM, BN = Traits::kBlockN, LDS = Traits::kSmemStride;
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + Traits::kTileElems;
  T* sQ = sV + Traits::kTileElems;       // 2 buffers
  T* sdO = sQ + 2 * Traits::kTileElems;  // 2 buffers
  float* sLse2 = reinterpret_cast<float*>(sdO + 2 * Traits::kTileElems);  // 2 x BM
  float* sDelta = sLse2 + 2 * BM;                                         // 2 x BM
  int* sQb = reinterpret_cast<int*>(sDelta + 2 * BM);                     // 2 x BM
  float* sDs = reinterpret_cast<float*>(sQb + 2 * BM);                    // BN x kDsStride
  // kRanges only (Traits::kBwdDkvRangesSmem more): the query rows' ranges and, per buffer and loading warp,
  // whether all its rows' ranges hold the whole key tile.
  int* sRangeLo = reinterpret_cast<int*>(sDs + BN * Traits::kDsStride);  // 2 x BM
  int* sRangeHi = sRangeLo + 2 * BM;                                      // 2 x BM
  int* sHolds = sRangeHi + 2 * BM;                                        // 2 x 2

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  // ceil(S / 64); with halo keys the tiles of their span; 0 with side_only (no band keys; the kRanges kernels only,
  // see dispatch_flags). (Written so: reading p.n_band_tiles in every instantiation made ptxas spill in the plain
  // D = 128 kernel.)
  const int n_band_ctas = kHalo ? p.n_band_tiles : kRanges && p.side_only ? 0 : (p.S + BN - 1) / BN;
  const int n_query_tiles = (p.S + BM - 1) / BM;

  KeyTile kt;
  int q_first, q_count;
  float* bias_partial = nullptr;
  int side_cta = 0, chunk = 0;
  kt.side = cta >= n_band_ctas;
  if (!kt.side) {
    kt.key0 = kHalo ? (p.band_tile0 + cta) * BN : cta * BN;
    const BandQueryTiles<BM, BN, kHalo> qt(p, kt.key0);
    q_first = qt.first;
    q_count = qt.count;
    if (p.band_bias != nullptr)
      bias_partial = p.dband_bias_partial + (((int64_t)b * p.H + h) * n_band_ctas + cta) * p.band_width;
    if constexpr (kRanges) narrow_query_tiles<Traits>(p, p.key_ranges, b, kt.key0, p.S, q_first, q_count);
    if ((!kRanges && !kHalo) || q_count > 0) load_band_kv_async<Traits, kHalo>(p, kt.key0, sK, sV, b, h, tid);
  } else {
    side_cta = cta - n_band_ctas;
    kt.key0 = (side_cta / p.side_chunks) * BN;
    chunk = side_cta % p.side_chunks;
    q_first = chunk * p.side_chunk_tiles;
    q_count = min(p.side_chunk_tiles, n_query_tiles - q_first);
    const int n_side_ctas = ((p.G + BN - 1) / BN) * p.side_chunks;
    if (p.side_bias != nullptr)
      bias_partial = p.dside_bias_partial + (((int64_t)b * p.H + h) * n_side_ctas + side_cta) * (2 * p.G + 1);
    kt.check_range = kt.key0 + BN > p.G;
    if constexpr (kRanges) narrow_query_tiles<Traits>(p, p.side_ranges, b, kt.key0, p.G, q_first, q_count);
    if (!kRanges || q_count > 0) load_side_kv_async<Traits, kIndexed>(p, kt.key0, sK, sV, b, h, tid);
  }
  // This CTA's kind of range (kRanges only), re-read from the parameters where used: fewer live registers.
  auto cta_ranges = [&] { return kt.side ? p.side_ranges : p.key_ranges; };

  // Query tile t's Q and dO go async; its per-row lse / delta / block id are plain stores (visible after
  // the __syncthreads that precedes their use).
  auto load_query_tile = [&](int t, int buf) {
    const int q0 = (q_first + t) * BM;
    load_query_tile_async<Traits, kQueryIndex>(sQ + buf * Traits::kTileElems, p, p.q, p.q_st, b, h, q0, tid);
    load_query_tile_async<Traits, kQueryIndex>(sdO + buf * Traits::kTileElems, p, p.dout, p.do_st, b, h, q0, tid);
    if (tid < BM) {
      const int i = q0 + tid;
      sLse2[buf * BM + tid] = lse_log2(p, b, h, i);
      sDelta[buf * BM + tid] = delta_at(p, b, h, i);
      sQb[buf * BM + tid] = clamp_query_block(p, b, i);
      if constexpr (kRanges) {
        // Rows >= S: an empty range (their P is 0 anyway), counted as holding the key tile.
        if (const int32_t* ranges = cta_ranges(); ranges != nullptr) {
          const RowRange r = i < p.S ? load_range(ranges, p, b, i) : RowRange{0, 0};
          sRangeLo[buf * BM + tid] = r.lo;
          sRangeHi[buf * BM + tid] = r.hi;
          const bool holds = __all_sync(0xffffffffu, i >= p.S || (r.lo <= kt.key0 && kt.key0 + BN <= r.hi));
          if (lane == 0) sHolds[buf * 2 + warp] = holds;  // tid < BM: warps 0 and 1, whole
        }
      }
    }
  };
  if ((!kRanges && !kHalo) || q_count > 0) load_query_tile(0, 0);  // kHalo: a halo tile no query sees
  cp_async_commit();

  // This thread's two key rows.
  const int k0 = kt.key0 + warp * 16 + lane / 4, k1 = k0 + 8;
  // Their key-mask bits, read once for all the CTA's query tiles.
  const uint64_t key_bits = tile_key_bits(p, kt, b, lane);
  const bool key_kept[2] = {bool((key_bits >> (k0 - kt.key0)) & 1u), bool((key_bits >> (k1 - kt.key0)) & 1u)};
  float acc_dk[D / 8][4], acc_dv[D / 8][4];
  zero(acc_dk);
  zero(acc_dv);
  DropoutCtx drop{};
  if constexpr (kDropout) drop = dropout_ctx<kHalo>(p, b, h);

  for (int t = 0; t < q_count; ++t) {
    const int buf = t & 1;
    const int q0 = (q_first + t) * BM;
    if (t + 1 < q_count) {
      load_query_tile(t + 1, buf ^ 1);  // buffer last read in iteration t - 1, which ended with a barrier
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* sQt = sQ + buf * Traits::kTileElems;
    const T* sdOt = sdO + buf * Traits::kTileElems;
    const float* lse2 = sLse2 + buf * BM;
    const float* delta = sDelta + buf * BM;
    const int* qb = sQb + buf * BM;
    if (!kt.side) kt.check_range = !band_tile_is_interior<BM, BN, kHalo>(p, q0, kt.key0);

    // The keep bits depend on indices only: drawn before the products, while few registers are live.
    uint32_t keep = 0;
    if constexpr (kDropout) keep = keep_mask_key_rows<BM>(drop, kt.side, k0, q0, lane);
    uint32_t in_range = ~0u;  // tested only when some query row's range does not hold the whole key tile
    if constexpr (kRanges) {
      if (cta_ranges() != nullptr && !(sHolds[buf * 2] && sHolds[buf * 2 + 1]))
        in_range = range_mask_key_rows<BM>(sRangeLo + buf * BM, sRangeHi + buf * BM, k0, k1, lane);
    }
    // Transposed products: rows are this warp's 16 keys, columns the tile's 64 queries.
    float pt[BM / 8][4], dpt[BM / 8][4];
    zero(pt);
    zero(dpt);
    gemm_nt<T, D, BM, LDS>(pt, sK + warp * 16 * LDS, sQt, lane);
    gemm_nt<T, D, BM, LDS>(dpt, sV + warp * 16 * LDS, sdOt, lane);
#pragma unroll
    for (int n = 0; n < BM / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int il = frag_col(lane, n, e);
        float sc = score_log2<kHalo>(p, kt, key_kept[e >> 1], pt[n][e], q0 + il, e >= 2 ? k1 : k0, b, h, qb[il]);
        if constexpr (kRanges) {
          if (!mask_bit(in_range, n, e)) sc = -INFINITY;
        }
        pt[n][e] = exp2f(sc - lse2[il]);
      }
    }
    uint32_t pa[BM / 16][4];
    if constexpr (kDropout) {
      // Z^T of this warp's 16 keys x 64 queries; P Z for dV, Z dP for dS.
      // (Packed pair by pair, as acc_to_a does: no second 16 x 64 float tile in registers.)
      const float zs = p.drop_scale;
#pragma unroll
      for (int n = 0; n < BM / 8; ++n) {
        pa[n / 2][(n % 2) * 2] = pack2<T>(pt[n][0] * keep_scale(keep, n, 0, zs), pt[n][1] * keep_scale(keep, n, 1, zs));
        pa[n / 2][(n % 2) * 2 + 1] =
            pack2<T>(pt[n][2] * keep_scale(keep, n, 2, zs), pt[n][3] * keep_scale(keep, n, 3, zs));
#pragma unroll
        for (int e = 0; e < 4; ++e) dpt[n][e] *= keep_scale(keep, n, e, zs);
      }
    } else {
      acc_to_a<T, BM>(pt, pa);
    }
    gemm_rs<T, BM, D, LDS>(acc_dv, pa, sdOt, lane);  // dV += (P Z)^T dO

#pragma unroll
    for (int n = 0; n < BM / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) dpt[n][e] = pt[n][e] * (dpt[n][e] - delta[frag_col(lane, n, e)]);  // dS^T
    }
    if (bias_partial != nullptr) {
#pragma unroll
      for (int n = 0; n < BM / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e)
          sDs[(warp * 16 + frag_row(lane, e)) * Traits::kDsStride + frag_col(lane, n, e)] = dpt[n][e];
      }
      __syncthreads();
      if (!kt.side) {
        band_bias_grad_tile<Traits>(p, sDs, kt.key0, q0, bias_partial, tid);
      } else {
        side_bias_grad_tile<Traits>(p, sDs, qb, kt.key0, q0, bias_partial, tid);
      }
    }
    acc_to_a<T, BM>(dpt, pa);
    gemm_rs<T, BM, D, LDS>(acc_dk, pa, sQt, lane);  // dK += dS^T Q (scaled at the end)
    __syncthreads();  // buffer buf and sDs are free for the next iteration
  }

  if (kHalo && !kt.side) {
    store_band_key_rows<T, D>(acc_dk, p, p.dk, p.dhalo_k, b, h, kt.key0 + warp * 16, lane, p.scale);
    store_band_key_rows<T, D>(acc_dv, p, p.dv, p.dhalo_v, b, h, kt.key0 + warp * 16, lane, 1.f);
  } else if (!kt.side) {
    const int64_t off = ((int64_t)b * p.S * p.H + h) * D;
    store_rows<T, D>(acc_dk, reinterpret_cast<T*>(p.dk) + off, (int64_t)p.H * D, kt.key0 + warp * 16, p.S,
                     lane, p.scale, p.scale);
    store_rows<T, D>(acc_dv, reinterpret_cast<T*>(p.dv) + off, (int64_t)p.H * D, kt.key0 + warp * 16, p.S,
                     lane, 1.f, 1.f);
  } else if (kRanges && p.dsk_partial == nullptr) {
    // Longformer's global rows (side_only, which runs the kRanges kernels only: the other instantiations keep their
    // code, and registers, without this): one query chunk and no band CTA, so this CTA alone owns its side keys'
    // rows, and its dK/dV are final: added into the rows they are (dside_*_into, whose earlier writes stream order
    // puts before this kernel, or Longformer's fused backward before this body), or stored into dside_k / dside_v. No
    // partial buffer, no atomics. Row by row (k0's, then k1's), so that even two slots naming one row would add up as
    // they did pair by pair.
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int g = (half ? k1 : k0);
      SideKeyRows<T> rows;
      if (g >= p.G || !side_key_rows(p, b, g, h, rows)) continue;
      put_acc_row<T, D>(rows.k, acc_dk, half, p.scale, lane, rows.add);
      put_acc_row<T, D>(rows.v, acc_dv, half, 1.f, lane, rows.add);
    }
  } else {
    // float32 partials (side_chunks, B, G, H, D) of this chunk.
    const int64_t off = (((int64_t)chunk * p.B + b) * p.G * p.H + h) * D;
    const int64_t row_stride = (int64_t)p.H * D;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int g = (half ? k1 : k0);
      if (g >= p.G) continue;
      float* dk_row = p.dsk_partial + off + g * row_stride;
      float* dv_row = p.dsv_partial + off + g * row_stride;
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        const int col = n * 8 + (lane % 4) * 2;
        *reinterpret_cast<float2*>(dk_row + col) =
            make_float2(acc_dk[n][2 * half] * p.scale, acc_dk[n][2 * half + 1] * p.scale);
        *reinterpret_cast<float2*>(dv_row + col) = make_float2(acc_dv[n][2 * half], acc_dv[n][2 * half + 1]);
      }
    }
  }
}

template <typename Traits, bool kDropout, bool kRanges, bool kHalo, bool kIndexed, bool kQueryIndex>
__global__ void __launch_bounds__(Traits::kThreads) band_side_bwd_dkdv_kernel(const BandSideParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  band_side_bwd_dkdv_tile<Traits, kDropout, kRanges, kHalo, kIndexed, kQueryIndex>(p, blockIdx.x, blockIdx.y,
                                                                                   blockIdx.z, smem_raw);
}

}  // namespace longattn

namespace longattn {

// ------------------------------------------------------------------------------------------------
// After the dK/dV kernel: everything its partial buffers still owe, in one launch (no ATen sum / cast / zero fill):
//   side keys (p.dsk_partial != nullptr: several query chunks, or side_index): per (b, g, h, column pair) one thread
//     sums the chunks' float32 partials in chunk order and writes the pair where side_key_rows says;
//   band-bias table (p.band_bias): per entry (h, t) one warp sums column t of the B x n_band_tiles partial rows of
//     head h and writes dband_bias[h, t] in its dtype;
//   side-bias table (p.side_bias): likewise per (h, u) over the B x n_side_ctas rows, into dside_bias.
// A warp's job is one of these (finish_warps: the side-key warps first, then the two tables'); a table sum is each
// lane's rows in order (lane, lane + 32, ...) then a fixed xor tree: every output has one writer and a fixed order of
// float32 adds, so the result is bitwise reproducible.
// ------------------------------------------------------------------------------------------------
struct FinishWarps {
  int64_t side_keys, band_bias, side_bias;
  __host__ __device__ int64_t total() const { return side_keys + band_bias + side_bias; }
};

__host__ __device__ inline FinishWarps finish_warps(const BandSideParams& p) {
  const int64_t pairs = p.dsk_partial != nullptr ? (int64_t)p.B * p.G * p.H * (p.D / 2) : 0;
  return {(pairs + 31) / 32, p.band_bias != nullptr ? (int64_t)p.H * p.band_width : 0,
          p.side_bias != nullptr ? (int64_t)p.H * (2 * p.G + 1) : 0};
}

// Column `col` of the partial rows of head h: (B, H, rows, width) float32, summed over b and rows by one warp.
__device__ __forceinline__ float warp_column_sum(const float* partial, const BandSideParams& p, int h, int rows,
                                                 int width, int col, int lane) {
  float acc = 0.f;
  for (int64_t r = lane; r < (int64_t)p.B * rows; r += 32) {
    const int64_t b = r / rows, x = r % rows;
    acc += partial[((b * p.H + h) * rows + x) * width + col];
  }
#pragma unroll
  for (int off = 16; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  return acc;
}

__device__ __forceinline__ void store_table(void* table, int kind, int64_t i, float x) {
  if (kind == kTableF32) {
    reinterpret_cast<float*>(table)[i] = x;
  } else if (kind == kTableBF16) {
    reinterpret_cast<__nv_bfloat16*>(table)[i] = __float2bfloat16_rn(x);
  } else {
    reinterpret_cast<__half*>(table)[i] = __float2half_rn(x);
  }
}

// Side key ((b * G + g) * H + h) = bgh's columns d, d + 1: its chunks' float32 partials summed in chunk order, then
// put where side_key_rows said (`rows`). Also run by Longformer's fused backward for the rows its global rows' dK/dV
// CTAs own (longformer/fused_bwd_rows.h).
template <typename T>
__device__ __forceinline__ void finish_side_key_pair(const BandSideParams& p, int64_t bgh, int d,
                                                     const SideKeyRows<T>& rows) {
  const int64_t chunk_stride = (int64_t)p.B * p.G * p.H * p.D;
  const int64_t at = bgh * p.D + d;
  float2 sk = make_float2(0.f, 0.f), sv = make_float2(0.f, 0.f);
  for (int c = 0; c < p.side_chunks; ++c) {
    const float2 a = *reinterpret_cast<const float2*>(p.dsk_partial + c * chunk_stride + at);
    const float2 e = *reinterpret_cast<const float2*>(p.dsv_partial + c * chunk_stride + at);
    sk.x += a.x;
    sk.y += a.y;
    sv.x += e.x;
    sv.y += e.y;
  }
  put_pair(rows.k + d, sk.x, sk.y, rows.add);
  put_pair(rows.v + d, sv.x, sv.y, rows.add);
}

// Finish job w (finish_warps), run by one warp: the finish kernel's body (job w = the grid's warp w), which
// Longformer's fused backward runs in its last launch (longformer/fused_bwd_rows.h) beside the global rows' dq sum and
// dK/dV, from the first table job on where the side keys' rows' owners take those.
template <typename T>
__device__ __forceinline__ void band_side_bwd_finish_warp(const BandSideParams& p, int64_t w) {
  const FinishWarps jobs = finish_warps(p);
  const int lane = threadIdx.x % 32;
  if (w < jobs.side_keys) {
    const int pairs_per_row = p.D / 2;
    const int64_t t = w * 32 + lane;
    if (t >= (int64_t)p.B * p.G * p.H * pairs_per_row) return;
    const int64_t bgh = t / pairs_per_row;  // ((b * G + g) * H + h)
    const int d = (int)(t % pairs_per_row) * 2;
    const int h = (int)(bgh % p.H);
    const int64_t bg = bgh / p.H;
    SideKeyRows<T> rows;
    if (side_key_rows(p, (int)(bg / p.G), (int)(bg % p.G), h, rows)) finish_side_key_pair(p, bgh, d, rows);
    return;
  }
  w -= jobs.side_keys;
  if (w < jobs.band_bias) {  // warp-uniform branches from here on
    const int h = (int)(w / p.band_width), col = (int)(w % p.band_width);
    const float sum = warp_column_sum(p.dband_bias_partial, p, h, p.n_band_tiles, p.band_width, col, lane);
    if (lane == 0) store_table(p.dband_bias, p.band_bias_kind, w, sum);
    return;
  }
  w -= jobs.band_bias;
  if (w < jobs.side_bias) {
    const int width = 2 * p.G + 1;
    const int h = (int)(w / width), col = (int)(w % width);
    const float sum = warp_column_sum(p.dside_bias_partial, p, h, side_ctas_per_bh(p), width, col, lane);
    if (lane == 0) store_table(p.dside_bias, p.side_bias_kind, w, sum);
  }
}

template <typename T>
__global__ void band_side_bwd_finish_kernel(const BandSideParams p) {
  band_side_bwd_finish_warp<T>(p, (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32);
}

}  // namespace longattn
