// Longformer's fused backward (longformer_fused_bwd_api.cpp, raw op cuda_longformer_bwd): the band pass's backward and
// the global rows' (key splits against the merged glse, their dK/dV added into the band pass's dk / dv) in 4 launches
// instead of the composed path's 8 (band: delta, dQ, dK/dV, finish; rows: delta, dQ, dK/dV; the rows' dq add):
//
//   1. longformer_bwd_delta_kernel   the band pass's delta rows, then the global rows' (band_side_bwd_delta_row each);
//   2. longformer_bwd_dq_kernel      the global rows' split dQ CTAs (n_lead of them, slot tile fastest, then the split
//                                    batch row b * C + c, then the head), then the band pass's query tiles (tile
//                                    fastest, then b, then h), each band_side_bwd_dq_tile on its own params;
//   3. band_side_bwd_dkdv_kernel     the band pass's (kIndexed; side keys' float32 partials over query chunks);
//   4. longformer_bwd_rows_kernel    (fused_bwd_rows.h) the band pass's finish warps (the side keys' partials added
//                                    into rows pos of dk / dv), one thread per element of the used slots' rows (the
//                                    splits' dq rows summed in split order and added into rows pos of dq: merge.h's
//                                    SplitRows), then the global rows' dK/dV CTAs (side_only, kQueryIndex): every
//                                    key's dK/dV added into dk / dv by the epilogue (dside_*_into; one owner CTA per
//                                    key row), or with separate global k / v projections stored into the splits'
//                                    dside_k / dside_v.
// With a separate global q projection the splits' dq sums go into dq_global, which the delta launch zeroes first (the
// composed path's zero-filled new dq, without a memset).
//
// Bitwise the composed path's gradients: every CTA / warp / thread runs the same code on the same params, and each
// output element sees the same adds in the same order (the band dK/dV stores, then the side keys' partial sum, then
// the global rows' dK/dV; dq: the band's store, then the splits' sum). The two delta bodies compute the same value for
// a global row (rowsum(dO * O) of the token, same lanes, same tree), so one launch computing both costs B * C * G * H
// warps more than reading the band's delta at pos would, and changes no kernel. In launch 4 the side-key sum of a
// global token's dk / dv row must precede its global rows' add; with shared k / v the CTA that owns the row adds both,
// in that order (fused_bwd_rows.h finish_owned_key_rows), so that pair of adds needs no launch boundary (it had one: a
// finish launch before the global rows' dK/dV).
// No dropout (the composed path runs it), no bias tables, no halo keys.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "band_side/params.h"
#include "longformer/rows.h"

namespace longattn {

struct LongformerBwdParams {
  BandSideParams band;  // the band pass's backward: kIndexed (side_index = pos, side_mask = used)
  BandSideParams rows;  // the global rows': side_only, query_index = pos, lse_split = C, dside_*_into = band dk / dv
                        // (k / v shared), else their dside_k / dside_v
  RowsParams add;       // the splits' dq rows (rows.dq, (B * C, G, H, D)) summed into rows pos of band.dq (or of
                        // dq_global: zero below)
  int n_slot_tiles;     // ceil(G / 64)
  int n_query_tiles;    // ceil(S / 64)
  int n_lead;           // the dQ launch's split CTAs: n_slot_tiles * B * C * H
  // Launch 4's layout (RowsLaunch), set by run_longformer_bwd: its band-finish CTAs (the finish jobs from
  // first_finish_warp on: with shared k / v the side keys' jobs are skipped, their rows' owners add those sums), its
  // slot-row CTAs (B * G * H * D elements), and the global rows' key tiles per (split batch row, head).
  int64_t n_finish_ctas;
  int64_t first_finish_warp;  // 0, or the side keys' warps: lead warp w runs band finish job first_finish_warp + w
  int64_t n_add_ctas;
  int n_key_tiles;
  int64_t n_lead_x;  // grid x past the key tiles (RowsLaunch::lead_x)
  // Separate global query projection: dq_global (add.rows, contiguous (B, S, H, D)), zeroed by the delta launch as
  // zero_count floats (grid-stride, as the band delta kernel zeroes bias partials) before launch 4 adds the
  // splits' dq sums into its slot rows; nullptr / 0: the sums go into band.dq.
  float* zero;
  int64_t zero_count;
};

// The 4 launches, in stream order (launch 4's layout filled in here). bf16: q's dtype is bfloat16 (else float16).
cudaError_t run_longformer_bwd(LongformerBwdParams p, bool bf16, cudaStream_t stream);

// Launch 4's grid (BandSideTraits::kThreads = 128 threads a CTA, fused_bwd_rows.h): (key_tiles + lead_x, rows_B, H).
// CTA (x, y, z) with x < key_tiles is the global rows' key tile x of split batch row y, head z (as their own dK/dV
// launch lays them out); the others are lead CTA number (z * rows_B + y) * lead_x + x - key_tiles: finish_ctas of
// finish_warps band finish warps (4 a CTA), then add_ctas of slot_elements = B * G * H * D slot-row elements (one a
// thread), the rest idle. The API checks grid_x() against the grid limit (y and z as the global rows' pass checks).
struct RowsLaunch {
  int64_t finish_ctas, add_ctas, key_tiles, lead_x;
  int64_t grid_x() const { return key_tiles + lead_x; }
};
inline RowsLaunch rows_launch(int64_t finish_warps, int64_t slot_elements, int64_t rows_B, int64_t keys, int64_t H) {
  const int64_t finish_ctas = (finish_warps + 3) / 4, add_ctas = (slot_elements + 127) / 128;
  const int64_t per_x = std::max<int64_t>(rows_B * H, 1);
  return {finish_ctas, add_ctas, (keys + 63) / 64, (finish_ctas + add_ctas + per_x - 1) / per_x};
}

// The dQ launch and launch 4 for one (dtype, head dim): defined in fused_bwd_dq.h and fused_bwd_rows.h, instantiated
// in instantiations/*.cu.
template <typename Traits>
cudaError_t launch_longformer_bwd_dq(const LongformerBwdParams& p, cudaStream_t stream);
template <typename Traits>
cudaError_t launch_longformer_bwd_rows(const LongformerBwdParams& p, cudaStream_t stream);

}  // namespace longattn
