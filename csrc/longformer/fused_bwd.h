// Longformer's fused backward (longformer_fused_bwd_api.cpp, raw op cuda_longformer_bwd): the band pass's backward and
// the global rows' (key splits against the merged glse, their dK/dV added into the band pass's dk / dv) in 5 launches
// instead of the composed path's 8 (band: delta, dQ, dK/dV, finish; rows: delta, dQ, dK/dV; the rows' dq add):
//
//   1. longformer_bwd_delta_kernel   the band pass's delta rows, then the global rows' (band_side_bwd_delta_row each);
//   2. longformer_bwd_dq_kernel      the global rows' split dQ CTAs (n_lead of them, slot tile fastest, then the split
//                                    batch row b * C + c, then the head), then the band pass's query tiles (tile
//                                    fastest, then b, then h), each band_side_bwd_dq_tile on its own params;
//   3. band_side_bwd_dkdv_kernel     the band pass's (kIndexed; side keys' float32 partials over query chunks);
//   4. longformer_bwd_finish_kernel  the band pass's finish warps (the side keys' partials added into rows pos of dk /
//                                    dv), then one thread per element of the used slots' rows: the splits' dq rows
//                                    summed in split order and added into rows pos of dq (merge.h's SplitRows);
//   5. band_side_bwd_dkdv_kernel     the global rows' (side_only, kQueryIndex): every key's dK/dV added into dk / dv by
//                                    the epilogue (dside_*_into; one owner CTA per key row), or with separate global
//                                    k / v projections stored into the splits' dside_k / dside_v.
// With a separate global q projection the splits' dq sums go into dq_global, which the delta launch zeroes first (the
// composed path's zero-filled new dq, without a memset).
//
// Bitwise the composed path's gradients: every CTA / warp / thread runs the same code on the same params, and each
// output element sees the same adds in the same order (the band dK/dV stores, then the side keys' partial sum, then
// the global rows' dK/dV; dq: the band's store, then the splits' sum). The two delta bodies compute the same value for
// a global row (rowsum(dO * O) of the token, same lanes, same tree), so one launch computing both costs B * C * G * H
// warps more than reading the band's delta at pos would, and changes no kernel. Launch 5 follows 4 only for that
// order: a global token's dk row is (0 + side keys' sum) + its rows' dK, as composed.
// No dropout (the composed path runs it), no bias tables, no halo keys.
#pragma once

#include <cuda_runtime.h>

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
  int64_t n_finish_ctas;  // the finish launch's band-finish CTAs: ceil(finish_warps(band).total() / 8), set by
                          // run_longformer_bwd
  // Separate global query projection: dq_global (add.rows, contiguous (B, S, H, D)), zeroed by the delta launch as
  // zero_count floats (grid-stride, as the band delta kernel zeroes bias partials) before the finish launch adds the
  // splits' dq sums into its slot rows; nullptr / 0: the sums go into band.dq.
  float* zero;
  int64_t zero_count;
};

// The 5 launches, in stream order (n_finish_ctas filled in here). bf16: q's dtype is bfloat16 (else float16).
cudaError_t run_longformer_bwd(LongformerBwdParams p, bool bf16, cudaStream_t stream);

// The dQ launch for one (dtype, head dim): defined in fused_bwd_dq.h, instantiated in instantiations/*.cu.
template <typename Traits>
cudaError_t launch_longformer_bwd_dq(const LongformerBwdParams& p, cudaStream_t stream);

}  // namespace longattn
