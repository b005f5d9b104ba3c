// Longformer's fused backward's last launch (fused_bwd.h, launch 4), instantiated per (dtype, head dim) in
// instantiations/bwd_rows_*.cu: one grid (fused_bwd.h RowsLaunch) of
//   - the global rows' dK/dV CTAs (side_only, kQueryIndex) at the coordinates of their own launch (key tile x, split
//     batch row b * C + c, head), each band_side_bwd_dkdv_tile on p.rows;
//   - lead CTAs (grid x from n_key_tiles on, numbered over (x, y, z)): n_finish_ctas of the band pass's finish warps
//     (kThreads / 32 a CTA: the side keys' column pairs unless the key owners take them, then any table sums;
//     band_side_bwd_finish_warp), then n_add_ctas of one element of the (B, G, H * D) slot rows a thread: the splits'
//     dq rows summed in split order and added into rows pos of dq or dq_global (merge.h SplitRows; unused slots and
//     bad positions: nothing).
// The key tiles keep their coordinates in blockIdx (as special registers, free to re-read), not derived from a flat
// index: derived, they stayed live through the query loop (D = 128: 104 / 80 bytes of spills; now 72 / 56, against
// 44 / 20 in the global rows' own launch; D = 64: 236 registers, no spill, against 237).
// None of the three writes what another reads or writes, except where the global rows' dK/dV is added into the band
// pass's dk / dv (k / v shared, p.rows.dside_k_into set): a global token's row there must first get the band pass's
// side-key sum (the composed path's order: band store, side-key sum, global rows' dK). So with shared keys those
// column pairs are not finish warps: the one CTA that owns the row in the global rows' pass (one query chunk, one owner
// per key row) adds the side-key sum itself, in the same threads, just before its own add (KeyRowFinish). Each element
// then sees the same adds in the same order as in the composed path and the 5-launch fused one: bitwise equal.
// Registers: those of the dK/dV tile body (the other two are small); smem: Traits::kBwdDkvRangesSmem for all.
#pragma once

#include "band_side/bwd_kernel.h"
#include "band_side/launch_template.h"
#include "longformer/fused_bwd.h"
#include "longformer/merge.h"

namespace longattn {

// The band pass's side-key finish for the key rows of one global rows' dK/dV CTA (the hook band_side_bwd_dkdv_tile
// runs, see NoKeyRowHook), active with shared k / v (p.rows.dside_k_into set; else a no-op, CTA-uniform). begin: the
// CTA's kBlockN rows -> the band slot whose token each is (kept slots only; -1: none), one pass over the batch row's G
// slots by the CTA; row: this thread's column pairs of that slot's row summed over the band pass's query chunks and
// added into dk / dv (finish_side_key_pair: what its finish warp would do). Everything but key0 and slot_of (set after
// the CTA's query loop) is read from the launch's params where used, so the hook holds no register across the loop.
template <typename Traits>
struct KeyRowFinish {
  static_assert(Traits::kThreads == 128, "fused_bwd.h rows_launch lays out 128-thread CTAs");
  static constexpr bool kActive = true;
  static constexpr int BN = Traits::kBlockN, kThreads = Traits::kThreads, D = Traits::kHeadDim;
  using T = typename Traits::Element;
  const LongformerBwdParams& p;
  int key0 = 0;            // the CTA's first split row
  int* slot_of = nullptr;  // BN ints of shared memory

  __device__ __forceinline__ bool active() const { return p.rows.dside_k_into != nullptr; }

  // Split batch row b = bb * C + c (bb: the band pass's batch row) and its split row g: row c * n + g of dk.
  __device__ __forceinline__ void begin(int b, int tile_key0, int* scratch, int tid) {
    if (!active()) return;
    key0 = tile_key0;
    slot_of = scratch;
    const BandSideParams& band = p.band;
    const int bb = b / p.rows.into_split;
    const int64_t row0 = (int64_t)(b % p.rows.into_split) * p.rows.G + tile_key0;  // the CTA's first row of dk
    for (int r = tid; r < BN; r += kThreads) slot_of[r] = -1;
    __syncthreads();
    for (int g = tid; g < band.G; g += kThreads) {
      if (band.side_mask != nullptr && !band.side_mask[(int64_t)bb * band.G + g]) continue;
      const int64_t r = band.side_index[(int64_t)bb * band.side_index_stride + g] - row0;
      if (r >= 0 && r < BN) slot_of[r] = g;  // kept slots name distinct rows (side_key_rows)
    }
    __syncthreads();
  }

  __device__ __forceinline__ void row(int b, int g, int h, int lane) const {
    if (!active()) return;
    const int slot = slot_of[g - key0];
    if (slot < 0) return;
    const BandSideParams& band = p.band;
    const int bb = b / p.rows.into_split;
    SideKeyRows<T> rows;
    if (!side_key_rows(band, bb, slot, h, rows)) return;
    const int64_t bgh = ((int64_t)bb * band.G + slot) * band.H + h;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) finish_side_key_pair(band, bgh, n * 8 + (lane % 4) * 2, rows);
  }
};

template <typename Traits>
__global__ void __launch_bounds__(Traits::kThreads) longformer_bwd_rows_kernel(const LongformerBwdParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  using T = typename Traits::Element;
  if ((int)blockIdx.x < p.n_key_tiles) {  // CTA-uniform: a key tile, at the coordinates of the rows' own launch
    band_side_bwd_dkdv_tile<Traits, false, true, false, false, true>(p.rows, blockIdx.x, blockIdx.y, blockIdx.z,
                                                                     smem_raw, KeyRowFinish<Traits>{p});
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
  const int64_t lead = p.n_finish_ctas + p.n_add_ctas, per_x = (int64_t)p.rows.B * p.rows.H;
  if (per_x == 0 || p.n_key_tiles + lead == 0) return cudaSuccess;
  const int64_t lead_x = (lead + per_x - 1) / per_x;  // rows_launch's
  return launch_kernel(longformer_bwd_rows_kernel<Traits>, dim3((unsigned)(p.n_key_tiles + lead_x), p.rows.B, p.rows.H),
                       Traits::kThreads, Traits::kBwdDkvRangesSmem, p, stream);
}

}  // namespace longattn

// The explicit instantiation of the last launch for one (dtype, head dim): the whole body of an instantiation file.
#define LONGATTN_INSTANTIATE_LONGFORMER_BWD_ROWS(Element, kHeadDim)                                                \
  template cudaError_t longattn::launch_longformer_bwd_rows<longattn::BandSideTraits<Element, kHeadDim>>(        \
      const longattn::LongformerBwdParams&, cudaStream_t);
