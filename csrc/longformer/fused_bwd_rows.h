// Longformer's fused backward's last launch (fused_bwd.h, launch 4), instantiated per (dtype, head dim) in
// instantiations/bwd_rows_*.cu: one grid (fused_bwd.h RowsLaunch) of
//   - the global rows' dK/dV CTAs (side_only, kQueryIndex) at the coordinates of their own launch (key tile x, split
//     batch row b * C + c, head), each band_side_bwd_dkdv_tile on p.rows;
//   - lead CTAs (grid x from n_key_tiles on, numbered over (x, y, z)): n_finish_ctas of the band pass's finish warps
//     (kThreads / 32 a CTA: the side keys' column pairs unless the key owners take them, then any table sums;
//     band_side_bwd_finish_warp), then n_add_ctas of one element of the (B, G, H * D) slot rows a thread: the splits'
//     dq rows summed in split order and added into rows pos of dq or dq_global (merge.h SplitRows; unused slots and
//     bad positions: nothing).
// The key tiles keep their coordinates in blockIdx (special registers, free to re-read), not derived from a flat
// index: derived, they stayed live through the query loop (D = 128: 104 / 80 bytes of spills, against 44 / 20 in the
// global rows' own launch).
// None of the three writes what another reads or writes, except where the global rows' dK/dV is added into the band
// pass's dk / dv (k / v shared, p.rows.dside_k_into set): a global token's row there must first get the band pass's
// side-key sum (the composed path's order: band store, side-key sum, global rows' dK). So with shared keys those
// column pairs are not finish warps: the one CTA that owns the row in the global rows' pass (one query chunk, one owner
// per key row) adds the side-key sum itself, in the same threads, before its query loop (finish_owned_key_rows). Each
// element then sees the same adds in the same order as in the composed path and the 5-launch fused one: bitwise equal.
// Registers: those of the dK/dV tile body (the other two are small); smem: Traits::kBwdDkvRangesSmem for all.
#pragma once

#include "band_side/bwd_kernel.h"
#include "band_side/launch_template.h"
#include "longformer/fused_bwd.h"
#include "longformer/merge.h"

namespace longattn {

// With shared k / v (p.rows.dside_k_into set; else nothing, CTA-uniform): the band pass's side-key sums added into
// the global tokens' rows among this global rows' dK/dV CTA's key rows, before its dK/dV body (which later adds into
// the same rows). The CTA's kBlockN rows -> the band slot whose token each is (kept slots only; -1: none), one pass
// over the batch row's G slots into shared memory; then each thread's column pairs of its two rows' slots summed over
// the band pass's query chunks and added into dk / dv (finish_side_key_pair: what the slot's finish warp would do).
// The threads take the rows and column pairs the body's epilogue gives them (key0 + warp * 16 + lane / 4 and + 8;
// columns n * 8 + (lane % 4) * 2), so each element's two adds are one thread's, in program order. Ends with a barrier:
// the body's loads may then overwrite `slot_of`. Split batch row b = bb * C + c (bb: the band pass's batch row), its
// split rows from key0: rows c * n + key0 + r of dk. Its thread index is read apart (thread_index_apart): with
// threadIdx.x, the compiler merged the row and column indices derived here with the body's, kept them live through
// the query loop, and the D = 128 kernel spilled 68 / 56 bytes with 11 local-memory accesses per query tile (the
// global rows' own launch: 44 / 20 and 4); apart, the query loop's registers, spills and instructions are those of
// the global rows' own launch (sm_90: D = 64 237 registers, 3919 instructions per tile; D = 128 44 / 20, 4507 -> 4510).
template <typename Traits>
__device__ __forceinline__ void finish_owned_key_rows(const LongformerBwdParams& p, int b, int h, int key0,
                                                      int* slot_of) {
  constexpr int BN = Traits::kBlockN, kThreads = Traits::kThreads, D = Traits::kHeadDim;
  static_assert(kThreads == 128, "fused_bwd.h rows_launch lays out 128-thread CTAs");
  if (p.rows.dside_k_into == nullptr) return;
  const BandSideParams& band = p.band;
  const int tid = thread_index_apart(), lane = tid % 32;
  const int bb = b / p.rows.into_split;
  const int64_t row0 = (int64_t)(b % p.rows.into_split) * p.rows.G + key0;  // the CTA's first row of dk
  for (int r = tid; r < BN; r += kThreads) slot_of[r] = -1;
  __syncthreads();
  for (int g = tid; g < band.G; g += kThreads) {
    if (band.side_mask != nullptr && !band.side_mask[(int64_t)bb * band.G + g]) continue;
    const int64_t r = band.side_index[(int64_t)bb * band.side_index_stride + g] - row0;
    if (r >= 0 && r < BN) slot_of[r] = g;  // kept slots name distinct rows (side_key_rows)
  }
  __syncthreads();
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = (tid / 32) * 16 + lane / 4 + 8 * half;
    const int slot = slot_of[r];
    SideKeyRows<typename Traits::Element> rows;
    if (key0 + r >= p.rows.G || slot < 0 || !side_key_rows(band, bb, slot, h, rows)) continue;
    const int64_t bgh = ((int64_t)bb * band.G + slot) * band.H + h;
#pragma unroll 1
    for (int n = 0; n < D / 8; ++n) finish_side_key_pair(band, bgh, n * 8 + (lane % 4) * 2, rows);
  }
  __syncthreads();
}

template <typename Traits>
__global__ void __launch_bounds__(Traits::kThreads) longformer_bwd_rows_kernel(const LongformerBwdParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  using T = typename Traits::Element;
  if ((int)blockIdx.x < p.n_key_tiles) {  // CTA-uniform: a key tile, at the coordinates of the rows' own launch
    finish_owned_key_rows<Traits>(p, blockIdx.y, blockIdx.z, blockIdx.x * Traits::kBlockN,
                                  reinterpret_cast<int*>(smem_raw));
    band_side_bwd_dkdv_tile<Traits, false, true, false, false, true>(p.rows, blockIdx.x, blockIdx.y, blockIdx.z,
                                                                     smem_raw);
    return;
  }
  const int64_t lead = ((int64_t)blockIdx.z * gridDim.y + blockIdx.y) * (gridDim.x - p.n_key_tiles) + blockIdx.x -
                       p.n_key_tiles;
  if (lead < p.n_finish_ctas) {
    band_side_bwd_finish_warp<T>(p.band, p.first_finish_warp + lead * (Traits::kThreads / 32) + threadIdx.x / 32);
    return;
  }
  const RowsParams& a = p.add;
  const int HD = a.H * a.D;
  const int64_t t = (lead - p.n_finish_ctas) * Traits::kThreads + threadIdx.x;
  if (t >= (int64_t)a.B * a.G * HD) return;  // also the idle CTAs past the add CTAs
  const int64_t bg = t / HD;
  const Slot slot = slot_at(a, (int)(bg / a.G), (int)(bg % a.G));
  if (slot.write) SplitRows<T>(a, slot).add(a, (int)(t % HD));
}

template <typename Traits>
cudaError_t launch_longformer_bwd_rows(const LongformerBwdParams& p, cudaStream_t stream) {
  if ((int64_t)p.rows.B * p.rows.H == 0 || p.n_key_tiles + p.n_lead_x == 0) return cudaSuccess;
  return launch_kernel(longformer_bwd_rows_kernel<Traits>,
                       dim3((unsigned)(p.n_key_tiles + p.n_lead_x), p.rows.B, p.rows.H), Traits::kThreads,
                       Traits::kBwdDkvRangesSmem, p, stream);
}

}  // namespace longattn

// The explicit instantiation of the last launch for one (dtype, head dim): the whole body of an instantiation file.
#define LONGATTN_INSTANTIATE_LONGFORMER_BWD_ROWS(Element, kHeadDim)                                                \
  template cudaError_t longattn::launch_longformer_bwd_rows<longattn::BandSideTraits<Element, kHeadDim>>(        \
      const longattn::LongformerBwdParams&, cudaStream_t);
