// Longformer's fused forward (longformer_fused_api.cpp, raw op cuda_longformer_fwd): the band pass and the global rows'
// key splits, with their merge, in one launch, after the slots kernel (slots.cu, which zeroes the arrival counters).
// Host entry point; the kernel is in fused_fwd.h, instantiated once per (dtype, head dim) in instantiations/*.cu.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "band_side/params.h"
#include "longformer/rows.h"

namespace longattn {

// Grid (n_lead + n_query_tiles * B * H): CTAs [0, n_lead) are the global rows' split CTAs (slot tile fastest, then
// the split batch row b * C + c, then the head: band_side_fwd_kernel's (x, y, z) order of `rows`), the others the band
// pass's query tiles (tile fastest, then b, then h).
struct LongformerFwdParams {
  BandSideParams band;  // the band pass: kIndexed (side_index = pos, side_mask = used contiguous, query_mask,
                        // band_rows_only); its out is the op's out
  BandSideParams rows;  // the global rows: side_only with query_index = pos, batch B * C (split c of batch row b is
                        // b * C + c), out / lse the splits' partials (B * C, G, H, D) / (B * C, H, G)
  RowsParams merge;     // the splits' merge (merge.h): parts / lse_parts the partials, rows = out, glse (B, H, G)
  int32_t* counter;     // (B, H, n_slot_tiles) arrival counters, zero before the launch
  int n_slot_tiles;     // ceil(G / 64)
  int n_query_tiles;    // ceil(S / 64)
  int n_lead;           // n_slot_tiles * B * C * H
};

// One launch (none for an empty grid). bf16: q's dtype is bfloat16 (else float16).
cudaError_t run_longformer_fwd(const LongformerFwdParams& p, bool bf16, cudaStream_t stream);

// The launch for one (dtype, head dim): defined in fused_fwd.h, instantiated in instantiations/*.cu.
template <typename Traits>
cudaError_t launch_longformer_fwd(const LongformerFwdParams& p, cudaStream_t stream);

}  // namespace longattn
