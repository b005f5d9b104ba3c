// Plain-old-data description of one band + side keys call, filled by the C++ API (band_side_api.cpp)
// and passed by value to every kernel. Kept free of torch types so the .cu files compile without the
// (slow) torch headers.
//
// Layouts (elements, not bytes): q/k/v/dout/out rows are addressed as
//   base + b * batch_stride + s * row_stride + h * head_stride + d        (d contiguous)
// and side_k/side_v the same with g in place of s. All offsets are computed in int64.
#pragma once

#include <cstdint>

namespace longattn {

// The dtype of a bias table and of its gradient (TableKind): the tile kernels read float32 (16-bit tables converted by
// longattn's own kernels, bias_tables.h), the finish kernel writes the gradient in the table's dtype.
enum TableKind : int { kTableF32 = 0, kTableF16 = 1, kTableBF16 = 2 };

struct Strides {
  int64_t batch, row, head;
};

struct BandSideParams {
  // ---- inputs ---------------------------------------------------------------------------------
  const void* q;
  const void* k;
  const void* v;
  const void* side_k;
  const void* side_v;
  Strides q_st, k_st, v_st, sk_st, sv_st;

  const uint8_t* band_key_mask;  // (B, S) bool or nullptr
  const uint8_t* side_mask;      // (B, G) bool or nullptr
  const int32_t* query_block;    // (B, S) or nullptr (only read when side_bias is given)
  const float* band_bias;        // (H, band_width) float32 or nullptr (a 16-bit table: its float32 copy, see below)
  const float* side_bias;        // (H, 2G + 1) float32 or nullptr

  int B, S, H, G, D;
  int left, right, band_width;  // band_width = left + right + 1
  float scale;                  // multiplies <q, k>

  // ---- attention dropout (only read by the kDropout = true kernels; see band_side/dropout.h) -------
  const int64_t* rng;         // [seed, offset] int64 on the device (CUDA-graph safe), or nullptr: no dropout
  uint32_t drop_threshold;    // keep = bits >= threshold = ceil(p * 2^32)
  float drop_scale;           // 1 / (1 - p)
  bool drop_global_rows;      // rows are Longformer global rows (the global-row counter words)

  // ---- forward outputs: out contiguous (B, S, H, D), lse contiguous float32 (B, H, S) ------------
  void* out;
  float* lse;

  // ---- backward ---------------------------------------------------------------------------------
  const void* dout;
  Strides do_st;
  const void* o;  // the forward output (strided like dout may be)
  Strides o_st;
  const float* lse_in;  // (B, H, S) natural-log lse from the forward
  float* delta;         // (B, H, S) scratch: rowsum(dout * out)

  void* dq;  // contiguous (B, S, H, D)
  void* dk;
  void* dv;
  // Side-key gradients: float32 partials (n_chunks, B, G, H, D) per query chunk, summed in chunk order by the finish
  // kernel; for Longformer's global rows (side_only: one chunk, dsk_partial == nullptr) the side CTA's dK/dV rows are
  // final and its epilogue writes them (side_key_rows). No atomics either way: deterministic.
  float* dsk_partial;
  float* dsv_partial;
  int side_chunks;       // number of query chunks per side-key tile
  int side_chunk_tiles;  // query tiles per chunk
  // Bias-table gradient partials, one row per (b, h, key CTA), zeroed by the delta kernel, accumulated by that CTA,
  // reduced in a fixed order by the finish kernel:
  //   band: (B, H, n_band_key_tiles, band_width);  side: (B, H, n_side_tiles * side_chunks, 2G + 1)
  float* dband_bias_partial;
  float* dside_bias_partial;

  // ---- per-row key ranges (only read by the kRanges = true kernels; see band_side/ranges.h) ----------
  // (B, S, 2) int32 or nullptr: row i of batch row b may attend band keys [key_ranges[b, i, 0],
  // key_ranges[b, i, 1]) and side keys [side_ranges[b, i, 0], side_ranges[b, i, 1]). Last in the struct, so
  // the other fields keep their offsets in the kernels' parameter space.
  const int32_t* key_ranges;
  const int32_t* side_ranges;

  // ---- halo keys (only read by the kHalo = true kernels; the backend contract's halo_k / halo_v) ------------
  // The band keys run over local positions j in [-halo_left, S + halo_right): j < 0 is row halo_left + j of
  // halo_k / halo_v ((B, halo_left + halo_right, H, D), strided like k), j >= S row halo_left + j - S, and their
  // key mask is halo_mask ((B, halo_left + halo_right) bool, or nullptr: all real). halo_k == nullptr: no halo
  // (also when halo_left + halo_right == 0). After the fields above, so those keep their offsets.
  const void* halo_k;
  const void* halo_v;
  Strides hk_st, hv_st;
  const uint8_t* halo_mask;
  int halo_left, halo_right;
  // Backward: dK/dV band CTA x works on key tile band_tile0 + x, x < n_band_tiles (without halo: 0 and
  // ceil(S / 64); with one, the tiles of the keys [max(-halo_left, -left), min(S + halo_right, S + right))), and
  // the halo keys' gradients go to dhalo_k / dhalo_v, contiguous (B, halo_left + halo_right, H, D).
  int band_tile0, n_band_tiles;
  void* dhalo_k;
  void* dhalo_v;

  // ---- lse gradient (backward; the contract's dlse) --------------------------------------------------------
  // (B, H, S) float32 or nullptr: the gradient of the forward's lse output. The delta kernel stores
  // delta - dlse (rows with lse = +inf keep delta: they get no gradient), which is all the other kernels need.
  const float* dlse;

  // ---- dropout offset (only read by the kDropout && kHalo kernels; the contract's dropout_offset) -------------
  // Query row i draws the dropout counters of row i + drop_offset and band key j (halo keys included) those of key
  // j + drop_offset: a sequence-parallel shard's start in its sequence, a multiple of 4, so a shard's keep bits are
  // the whole sequence's. Side keys and Longformer global rows keep their ids. A call with an offset runs the kHalo
  // kernels even with an empty halo, so the others never read it (their code is the code without it).
  int drop_offset;

  // ---- Longformer band pass (only read by the kIndexed = true kernels; the backend's longformer_band_*) --------
  // side_index: (B, G) int64 (row stride side_index_stride), or nullptr: side key g of batch row b is row
  // side_index[b, g] of side_k / side_v, which are then (B, S, H, D) (k and v themselves), read in place; indices
  // outside [0, S) read zeros (and get no gradient). query_mask: (B, S) bool or nullptr, forward only: rows where it
  // is False get out = 0. band_rows_only (forward): rows where band_key_mask is False get lse = +inf. Backward: the
  // side keys' dK/dV partials are summed and added into rows side_index[b, g] of dk / dv for the slots side_mask
  // keeps (by the finish kernel). With key_ranges / side_ranges (a packed batch: the kIndexed && kRanges kernels)
  // side_ranges[b, i] is a range of slots g, the same index the side keys have without side_index. After the fields
  // above, so those keep their offsets.
  const int64_t* side_index;
  int64_t side_index_stride;
  const uint8_t* query_mask;
  bool band_rows_only;

  // ---- Longformer's global rows (the backend's global_rows_*: slot queries against key splits) ----------------
  // side_only: the rows attend their side keys only: no band tile is walked (forward, dQ) and the dK/dV grid has no
  // band CTAs (n_band_tiles = 0), so no band key mask has to exist. lse_split (backward, >= 1): the given lse is
  // lse_merged, (B / lse_split, H, S) (every key split of a slot against the merged statistics), and the delta kernel
  // copies row b / lse_split of it into row b of lse_expanded (= lse_in, (B, H, S)) before the dQ / dK/dV kernels
  // read it: their code is unchanged. lse_split = 1: lse_merged / lse_expanded unused.
  // dside_k_into / dside_v_into (backward, or nullptr): the side keys' dK/dV are added into them instead of being
  // returned (by the dK/dV epilogue: side_only runs one query chunk, so each key row has one owner CTA; the finish
  // kernel would add summed partials the same way): side key g of batch row b is row (b % into_split) * G + g of
  // batch row b / into_split of these (B / into_split, into_rows, H, D) tensors (strided as dsk_into_st /
  // dsv_into_st, unit last stride), rows >= into_rows dropped (the keys' padding), slots side_mask drops skipped.
  // After the fields above, so those keep their offsets.
  bool side_only;
  int lse_split;
  const float* lse_merged;
  float* lse_expanded;
  void* dside_k_into;
  void* dside_v_into;
  Strides dsk_into_st, dsv_into_st;
  int into_split, into_rows;

  // ---- Longformer's global rows read in place (only with side_only; only read by the kQueryIndex = true kernels,
  // which dispatch_flags runs for a non-null query_index, and the delta kernel's kQueryIndex instantiation) ----------
  // query_index: (B / query_split, S) int64 (row stride query_index_stride, unit last stride), or nullptr. Row i of
  // batch row b (the op's "sequence" is the S = G slots of each key split b = b_q * query_split + c) reads its q, and
  // in the backward its dout and out, at token query_index[b / query_split, i] of batch row b / query_split of those
  // (B / query_split, query_tokens, H, D) tensors (strided as q_st / do_st / o_st), in place: no copy of the slots'
  // rows per split. out, lse, dq keep the op's (B, S, ...) layout. A token outside [0, query_tokens) reads zeros:
  // the forward gives the row out = 0 and lse = +inf, the delta kernel delta = 0 (dlse ignored), so the backward
  // gives it dq = 0 and no key gradient whatever lse it is given. After the fields above, so those keep their
  // offsets.
  const int64_t* query_index;
  int64_t query_index_stride;
  int query_split;
  int query_tokens;

  // ---- bias tables' dtypes and the backward's outputs (after the fields above, so those keep their offsets) ----
  // band_bias_kind / side_bias_kind: the caller's tables' dtypes (TableKind). A 16-bit table (fp16 / bf16, what LongT5
  // models pass) is band_bias_in / side_bias_in (contiguous, that dtype), converted into the float32 workspace that
  // band_bias / side_bias then point to by longattn's own kernel before any tile kernel reads it (bias_tables.h: the
  // forward's conversion launch, the backward's delta kernel); nullptr for a float32 table (read in place) or none.
  // The tile kernels read float32 only: a per-element dtype switch in their score loop cost 15-30 % on an H200. The
  // finish kernel writes the gradients dband_bias (H, band_width) / dside_bias (H, 2G + 1) (contiguous, the table's
  // kind) from the partials above. dside_k / dside_v: contiguous (B, G, H, D) of q's dtype, the side keys' gradients
  // when neither side_index nor dside_k_into takes them (written by the dK/dV epilogue with one chunk, else by the
  // finish kernel).
  int band_bias_kind, side_bias_kind;
  void* dband_bias;
  void* dside_bias;
  void* dside_k;
  void* dside_v;
  const void* band_bias_in;
  const void* side_bias_in;
};

}  // namespace longattn
