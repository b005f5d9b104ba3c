// Longformer's glue kernels around the band kernels (longattn/backends/_longformer.py): the slot layout of the
// global tokens, and the merge / gradient sum of the global rows' key splits (whose band op reads the slots' rows in
// place: csrc/band_side, query_index). Host entry points; kernels in slots.cu and rows.cu, torch-facing checks in
// longformer_api.cpp.
//
// Index safety: slot positions (pos) are never range-checked on the host (that would sync); a position outside
// [0, S) is skipped (nothing read or written through it). Used slots must name distinct positions within a row
// (global_slots' layout guarantees it) for the in-place writes to be race-free.
//
// Determinism: no atomics; every output element is written by one thread, which sums the C splits in split order.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace longattn {

// The slot layout (_longformer.global_slots): one CTA per batch row; the CTAs also zero `zero` (fused.h's counters).
struct SlotsParams {
  int B, S, G;
  const uint8_t* global_mask;  // (B, S) bool, any strides
  int64_t gm_sb, gm_ss;
  const uint8_t* pad_mask;  // (B, S) bool (True = real token), any strides; nullptr: every token real
  int64_t pm_sb, pm_ss;
  uint8_t* band_rows;  // (B, S) bool, contiguous: real & ~global
  int64_t* pos;        // (B, G) int64, contiguous: globals in order, then non-globals in order
  uint8_t* used;       // (B, G) bool, contiguous: the slot holds a global
  // Longformer's fused forward (fused.h): its arrival counters, zeroed here so that its one launch needs no memset
  // (zero_count int32 entries; nullptr / 0: none).
  int32_t* zero;
  int64_t zero_count;
};

enum class RowsDType { kFloat32, kFloat16, kBFloat16 };

// The global rows' C key splits (_longformer.KeySplits: split c of batch row b is row b * C + c of the parts).
struct RowsParams {
  int B, S, G, H, D, C;
  RowsDType dtype;
  const void* parts;       // (B * C, G, H, D) contiguous: merge: the splits' out; add: the splits' dq rows
  const float* lse_parts;  // (B * C, H, G) contiguous float32 (merge only); +inf = no key in the split
  const int64_t* pos;      // (B, G), unit last stride
  const uint8_t* used;     // (B, G) bool, unit last stride (merge and add only)
  int64_t pos_sb, used_sb;
  void* rows;              // (B, S, H, D), last dim contiguous: merge: out (overwritten); add: dq (added into)
  int64_t rows_sb, rows_ss, rows_sh;
  float* glse;  // (B, H, G) contiguous float32 (merge only)
};

cudaError_t run_global_slots(const SlotsParams& p, cudaStream_t stream);
// rows[b, pos[b, g]] = log-sum-exp merge of the splits (used slots); glse = merged lse, +inf for unused slots and
// rows with no key in any split.
cudaError_t run_rows_merge(const RowsParams& p, cudaStream_t stream);
// rows[b, pos[b, g]] += sum over splits of parts (used slots), in float32, rounded once.
cudaError_t run_rows_add(const RowsParams& p, cudaStream_t stream);

}  // namespace longattn
