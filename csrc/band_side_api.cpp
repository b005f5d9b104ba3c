// Torch-facing API of the band + side attention kernels: argument checks, output allocation, the
// side-key chunking choice, and the fixed-order reductions of the partial buffers. Registered as the
// CUDA implementations of longattn::cuda_band_side_fwd / cuda_band_side_bwd (schemas in extension.cpp),
// and as CPU implementations that run the same checks and then say the op needs CUDA tensors.
//
// The checks repeat what the Python API validates because the raw ops are callable directly
// (torch.ops.longattn.cuda_band_side_fwd): whatever they are given, the kernels must not read or write
// out of bounds. All of them (check_fwd_args / check_bwd_args) run before any copy, allocation or CUDA
// call. Strides: q, k, v, side_k, side_v, dout and out must have a dense last dim (checked; the others are
// free, and an operand whose row starts break cp.async's 16-byte alignment is copied); masks, query_block,
// the bias tables and lse are copied to the dense layout the kernels index when they are not in it (float32 bias tables
// are read in place, float16 / bfloat16 ones converted to float32 by longattn's own kernels (the forward's conversion
// launch, the backward's delta kernel), and their gradients written in the table's dtype: no ATen cast). Values
// inside tensors are not checked (that would cost a device sync): query_block entries are clamped to
// [-1, G-1] in the kernels, masks are bool by type, and per-row key ranges (key_ranges / side_ranges, int32
// (B, S, 2), checked contiguous) may hold any values: the kernels only ever mask with them.
//
// Halo keys (halo_k / halo_v (B, HL + HR, H, D) strided like k, halo_mask (B, HL + HR) bool, halo_left = HL;
// the backend contract's "halo") are read in place by the kHalo kernels; the backward returns their gradients
// (dhalo_k, dhalo_v) after the usual seven (empty (0,) tensors without a halo). Not combined with per-row key
// ranges. dlse ((B, H, S) float32, the lse output's gradient; "lse_grad") enters through delta. dropout_offset (a
// multiple of 4, only with dropout, "dropout_offset"): query row i and band key j draw the dropout counters of
// i + offset and j + offset (a sequence-parallel shard's start); a call with one runs the kHalo kernels.
//
// Longformer's band pass (the backend's longformer_band_forward / _backward): side_index ((B, G) int64, unit last
// stride) makes side key g of batch row b token side_index[b, g] of side_k / side_v, then (B, S, H, D) (k and v
// themselves), read in place by the kIndexed kernels; query_mask ((B, S) bool, forward) zeroes the output of rows
// where it is False and band_rows_only (forward) sets the lse of rows outside band_key_mask to +inf, both in the
// kernel's epilogue. The backward adds the side keys' dK/dV into rows side_index of dk / dv (the finish kernel,
// band_side_bwd_finish_kernel: the kept slots of a batch row must name distinct rows, as Longformer's do; any index
// value is safe) and returns dside_k / dside_v empty. With key_ranges / side_ranges (a packed batch) it runs the
// kIndexed && kRanges kernels: side_ranges[b, i] is a range of slots g. Not combined with halo keys or a dropout
// offset.
//
// Longformer's global rows (the backend's global_rows_*: each slot's query row against one key split, a batch row
// per split): side_only makes the rows attend their side keys only (no band tile walked, no band CTA in the dK/dV
// grid; band_key_mask, band_bias, key_ranges, side_index and halo keys must be None, and the backward returns dk / dv
// empty). The backward's lse_split reads the lse of batch row b at row b / lse_split of an (B / lse_split, H, S) lse
// (every split against the merged statistics; no dlse then), and dside_k_into / dside_v_into ((B / C, S', H, D), any
// strides keeping element pairs 4-byte aligned, C = B / their batch size) take the side keys' dK/dV added in: side
// key g of batch row b is row (b % C) * G + g of batch row b / C, rows >= S' dropped (added by the dK/dV kernel's
// epilogue: side_only runs one query chunk, so each key row has one owner CTA and no partials exist); dside_k /
// dside_v then come back empty.
//
// The backward runs at most 4 kernels: delta, dQ, dK/dV and the finish kernel (only when a partial buffer exists:
// several query chunks or side_index, or a bias table), and no ATen kernel for contiguous inputs.
//
// query_index ((B_q, G) int64, unit last stride; only with side_only) has the global rows read their query rows in
// place instead of from a copy per split: q (k and v, unused, like it; in the backward dout and out too) is then the
// unsplit (B_q, S, H, D) tensor, the op's batch is side_k's B = B_q * C (C key splits: B_q must divide it) and its
// "sequence" the G slots: row g of batch row b reads token query_index[b / C, g] of batch row b / C. out, lse and dq
// (and the backward's lse, dlse) keep the op's (B, G, ...) layout. A token outside [0, S) reads zeros: the row gets
// out = 0 and lse = +inf, and in the backward dq = 0 and no key gradient (the delta kernel gives it delta = 0).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include "band_side/launch.h"
#include "band_side_call.h"
#include "common/arg_checks.h"
#include "common/philox.h"

namespace longattn {
namespace {

using namespace argcheck;
using OptTensor = std::optional<at::Tensor>;

constexpr int kTile = 64;  // BandSideTraits::kBlockM == kBlockN; the host needs it for grid / buffer sizes
constexpr const char* kFwd = "cuda_band_side_fwd";
constexpr const char* kBwd = "cuda_band_side_bwd";

using Dims = BandSideDims;

// The halo-key arguments of both ops (all absent / 0 without a halo).
struct HaloArgs {
  const OptTensor& k;
  const OptTensor& v;
  const OptTensor& mask;
  int64_t left;
};

const char* given(const OptTensor& t) { return t.has_value() ? "a tensor" : "None"; }

// A (B, rows, H, D) operand like q: device, dtype, shape, dense last dim. `batch`: B when it is not q's (-1), i.e. the
// key splits' B_q * C with query_index.
void check_operand(const char* op, const at::Tensor& t, const char* name, const at::Tensor& q, int64_t rows,
                   const char* dims, int64_t batch = -1) {
  same_device(op, t, name, q, "q");
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, ": ", name, " must have q's dtype ", q.scalar_type(),
              ", got ", t.scalar_type());
  shape_is(op, t, name, {batch < 0 ? q.size(0) : batch, rows, q.size(2), q.size(3)}, dims);
  last_dim_contiguous(op, t, name);
}

void check_optional(const char* op, const OptTensor& t, const char* name, const at::Tensor& q,
                    std::optional<at::ScalarType> dtype, std::initializer_list<int64_t> shape, const char* dims) {
  if (!t.has_value()) return;
  same_device(op, *t, name, q, "q");
  if (dtype.has_value())
    dtype_is(op, *t, name, *dtype);
  else
    floating(op, *t, name);
  shape_is(op, *t, name, shape, dims);
}

// Longformer's band-pass arguments (side_index; query_mask and band_rows_only are the forward's, else None / false)
// and its global rows' side_only and query_index.
struct IndexArgs {
  const OptTensor& side_index;
  const OptTensor& query_mask;
  bool band_rows_only;
  bool side_only;
  const OptTensor& query_index;
};

// The backward's global-rows arguments: lse_split and the side keys' gradient destinations (or None).
struct SplitArgs {
  int64_t lse_split;
  const OptTensor& dsk_into;
  const OptTensor& dsv_into;
};

// The dropout arguments of both ops.
struct DropoutArgs {
  double p;
  const OptTensor& rng;
  bool global_rows;
  int64_t offset;  // dropout_offset
};

// Halo keys: (HL, HR), after q, k, v are checked. The kernels index keys j in [-HL, S + HR) with ints, so
// S + HL + HR < 2^30 (also keeps left + right + 1 < 2^31).
std::pair<int64_t, int64_t> check_halo_args(const char* op, const at::Tensor& q, const HaloArgs& halo,
                                            const OptTensor& key_ranges, const OptTensor& side_ranges) {
  TORCH_CHECK(halo.k.has_value() == halo.v.has_value(), op, ": halo_k and halo_v must be given together, got ",
              given(halo.k), " and ", given(halo.v));
  if (!halo.k.has_value()) {
    TORCH_CHECK(!halo.mask.has_value(), op, ": halo_mask needs halo_k, got halo_k = None");
    TORCH_CHECK(halo.left == 0, op, ": halo_left needs halo_k, got halo_left = ", halo.left, " with halo_k = None");
    return {0, 0};
  }
  const at::Tensor& hk = *halo.k;
  TORCH_CHECK(hk.dim() == 4, op, ": halo_k must have shape (B, HL + HR, H, D), got ", hk.sizes());
  const int64_t rows = hk.size(1), S = q.size(1);
  TORCH_CHECK(S + rows < (int64_t(1) << 30), op, ": S + halo_k's HL + HR must be < 2^30, got ", S, " + ", rows);
  check_operand(op, hk, "halo_k", q, rows, "(B, HL + HR, H, D)");
  check_operand(op, *halo.v, "halo_v", q, rows, "(B, HL + HR, H, D)");
  TORCH_CHECK(0 <= halo.left && halo.left <= rows, op, ": halo_left must be in [0, HL + HR] = [0, ", rows,
              "], got ", halo.left);
  check_optional(op, halo.mask, "halo_mask", q, at::kBool, {q.size(0), rows}, "(B, HL + HR)");
  if (halo.mask.has_value()) contiguous(op, *halo.mask, "halo_mask");
  TORCH_CHECK(!key_ranges.has_value(), op, ": key_ranges must be None with halo keys (halo_k), got a tensor");
  TORCH_CHECK(!side_ranges.has_value(), op, ": side_ranges must be None with halo keys (halo_k), got a tensor");
  return {halo.left, rows - halo.left};
}

// Dropout (after the halo): p in [0, 1), rng on the device (the kernels read [seed, offset] from it, in
// longattn/_dropout.py's layout) and the offset. Ids i + offset / j + offset are ints in the kernels: rows and keys
// (up to the last tile's end) stay below 2^31. The offset runs the kHalo kernels, which have no ranges.
void check_dropout_args(const char* op, const at::Tensor& q, const DropoutArgs& drop, int64_t HR,
                        const OptTensor& key_ranges, const OptTensor& side_ranges) {
  TORCH_CHECK(drop.p >= 0.0 && drop.p < 1.0, op, ": dropout_p must be in [0, 1), got ", drop.p);
  TORCH_CHECK(drop.p == 0.0 || drop.rng.has_value(), op,
              ": rng (the int64 [seed, offset] tensor) is required with dropout_p > 0, got None with dropout_p = ",
              drop.p);
  check_optional(op, drop.rng, "rng", q, at::kLong, {2}, "(2,)");
  if (drop.offset == 0) return;
  TORCH_CHECK(drop.p > 0.0, op, ": dropout_offset needs dropout_p > 0, got dropout_offset = ", drop.offset,
              " with dropout_p = ", drop.p);
  TORCH_CHECK(drop.offset > 0 && drop.offset % 4 == 0, op,
              ": dropout_offset must be a non-negative multiple of 4 (the counters' groups of 4 keys), got ",
              drop.offset);
  const int64_t limit = (int64_t(1) << 31) - 2 * kTile - q.size(1) - HR;
  TORCH_CHECK(drop.offset < limit, op, ": dropout_offset + S + HR must be < 2^31 - 128, got ", drop.offset, " + ",
              q.size(1), " + ", HR);
  TORCH_CHECK(!drop.global_rows, op, ": dropout_offset must be 0 with dropout_global_rows, got ", drop.offset);
  TORCH_CHECK(!key_ranges.has_value() && !side_ranges.has_value(), op,
              ": key_ranges / side_ranges must be None with dropout_offset, got a tensor with dropout_offset = ",
              drop.offset);
}

// Longformer's band pass: G (side_index's slot count), or -1 without side_index; after q, before the side keys.
int64_t check_index_args(const char* op, const at::Tensor& q, const IndexArgs& index, const OptTensor& band_key_mask,
                         const DropoutArgs& drop, const HaloArgs& halo) {
  if (!index.side_index.has_value()) {
    TORCH_CHECK(!index.query_mask.has_value(), op, ": query_mask needs side_index, got side_index = None");
    TORCH_CHECK(!index.band_rows_only, op, ": band_rows_only needs side_index, got side_index = None");
    return -1;
  }
  const at::Tensor& idx = *index.side_index;
  same_device(op, idx, "side_index", q, "q");
  dtype_is(op, idx, "side_index", at::kLong);
  TORCH_CHECK(idx.dim() == 2 && idx.size(0) == q.size(0), op, ": side_index must have shape (B, G) with B = ",
              q.size(0), ", got ", idx.sizes());
  TORCH_CHECK(idx.size(1) < (int64_t(1) << 28), op, ": side_index's G must be < 2^28, got ", idx.size(1));
  TORCH_CHECK(idx.size(1) <= 1 || idx.stride(1) == 1, op, ": side_index must have a unit last stride, got strides ",
              idx.strides());
  check_optional(op, index.query_mask, "query_mask", q, at::kBool, {q.size(0), q.size(1)}, "(B, S)");
  if (index.query_mask.has_value()) contiguous(op, *index.query_mask, "query_mask");
  TORCH_CHECK(!index.band_rows_only || band_key_mask.has_value(), op,
              ": band_rows_only needs band_key_mask, got band_key_mask = None");
  // key_ranges / side_ranges are welcome (a packed batch: the kIndexed && kRanges kernels; side_ranges index the
  // slots g); halo keys and a dropout offset (the kHalo kernels) are not.
  TORCH_CHECK(!halo.k.has_value(), op, ": halo_k must be None with side_index (no kernel has both), got a tensor");
  TORCH_CHECK(drop.offset == 0 && !drop.global_rows, op,
              ": dropout_offset / dropout_global_rows must be 0 / False with side_index, got ", drop.offset, " / ",
              drop.global_rows);
  return idx.size(1);
}

// Longformer's global rows read in place (IndexArgs::query_index; after q and the index arguments, before the side
// keys) -> the op's (B, S): q's without query_index, else (side_k's B = B_q * C, G).
std::pair<int64_t, int64_t> check_query_index(const char* op, const at::Tensor& q, const IndexArgs& index,
                                              const at::Tensor& side_k) {
  if (!index.query_index.has_value()) return {q.size(0), q.size(1)};
  const at::Tensor& idx = *index.query_index;
  TORCH_CHECK(index.side_only, op, ": query_index needs side_only (the global rows' key splits), got a tensor with ",
              "side_only = False");
  TORCH_CHECK(!index.side_index.has_value(), op, ": side_index must be None with query_index, got a tensor");
  same_device(op, idx, "query_index", q, "q");
  dtype_is(op, idx, "query_index", at::kLong);
  TORCH_CHECK(idx.dim() == 2 && idx.size(0) == q.size(0), op, ": query_index must have shape (B_q, G) with B_q = q's B",
              " = ", q.size(0), ", got ", idx.sizes());
  TORCH_CHECK(idx.size(1) < (int64_t(1) << 30), op, ": query_index's G must be < 2^30, got ", idx.size(1));
  TORCH_CHECK(idx.size(1) <= 1 || idx.stride(1) == 1, op, ": query_index must have a unit last stride, got strides ",
              idx.strides());
  TORCH_CHECK(side_k.dim() == 4, op, ": side_k must have shape (B, G, H, D), got ", side_k.sizes());
  const int64_t B = side_k.size(0), Bq = q.size(0);
  TORCH_CHECK(Bq > 0 ? B % Bq == 0 : B == 0, op, ": side_k's B must be a multiple of q's B_q = ", Bq,
              " with query_index (B_q * C key splits), got ", B);
  TORCH_CHECK(B <= 65535, op, ": side_k's B must be <= 65535 with query_index (the op's batch, a CUDA grid limit), ",
              "got ", B);
  return {B, idx.size(1)};
}

// Every argument the two passes share, in dependency order (q first: its sizes define the others').
Dims check_fwd_args(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& side_k, const at::Tensor& side_v, const OptTensor& band_key_mask,
                    const OptTensor& side_mask, const OptTensor& query_block, const OptTensor& band_bias,
                    const OptTensor& side_bias, int64_t left, int64_t right, double scale,
                    const DropoutArgs& drop, const OptTensor& key_ranges, const OptTensor& side_ranges,
                    const HaloArgs& halo, const IndexArgs& index) {
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, op,
              ": q must be float16 or bfloat16 (the kernels' tensor-core types), got ", q.scalar_type());
  TORCH_CHECK(q.dim() == 4, op, ": q must have shape (B, S, H, D), got ", q.sizes());
  const int64_t H = q.size(2), D = q.size(3);
  TORCH_CHECK(D == 32 || D == 64 || D == 128, op, ": q's head dim D must be 32, 64 or 128, got ", D);
  TORCH_CHECK(q.size(0) <= 65535 && H <= 65535, op, ": q's B and H must be <= 65535 (CUDA grid limits), got B = ",
              q.size(0), ", H = ", H);
  TORCH_CHECK(q.size(1) < (int64_t(1) << 30), op, ": q's S must be < 2^30, got ", q.size(1));
  last_dim_contiguous(op, q, "q");
  check_operand(op, k, "k", q, q.size(1), "(B, S, H, D)");
  check_operand(op, v, "v", q, q.size(1), "(B, S, H, D)");
  const int64_t indexed_g = check_index_args(op, q, index, band_key_mask, drop, halo);
  // The op's batch rows and rows per batch row: q's, or with query_index the key splits' B_q * C and the slots.
  const auto [B, S] = check_query_index(op, q, index, side_k);
  if (indexed_g >= 0) {  // side keys are rows of (B, S, H, D) side_k / side_v named by side_index
    check_operand(op, side_k, "side_k", q, S, "(B, S, H, D) with side_index");
    check_operand(op, side_v, "side_v", q, S, "(B, S, H, D) with side_index");
  } else {
    TORCH_CHECK(side_k.dim() == 4, op, ": side_k must have shape (B, G, H, D), got ", side_k.sizes());
    TORCH_CHECK(side_k.size(1) < (int64_t(1) << 28), op, ": side_k's G must be < 2^28, got ", side_k.size(1));
    check_operand(op, side_k, "side_k", q, side_k.size(1), "(B, G, H, D)", B);
    check_operand(op, side_v, "side_v", q, side_k.size(1), "(B, G, H, D)", B);
  }
  const int64_t G = indexed_g >= 0 ? indexed_g : side_k.size(1);
  const auto [HL, HR] = check_halo_args(op, q, halo, key_ranges, side_ranges);
  if (!halo.k.has_value()) {
    const int64_t max_offset = std::max<int64_t>(S - 1, 0);
    TORCH_CHECK(0 <= left && left <= max_offset, op, ": left must be in [0, S - 1] = [0, ", max_offset, "], got ",
                left);
    TORCH_CHECK(0 <= right && right <= max_offset, op, ": right must be in [0, S - 1] = [0, ", max_offset,
                "], got ", right);
  } else {  // the window may reach across the halo
    const int64_t max_left = std::max<int64_t>(S + HL - 1, 0), max_right = std::max<int64_t>(S + HR - 1, 0);
    TORCH_CHECK(0 <= left && left <= max_left, op, ": left must be in [0, S + HL - 1] = [0, ", max_left,
                "] with halo keys, got ", left);
    TORCH_CHECK(0 <= right && right <= max_right, op, ": right must be in [0, S + HR - 1] = [0, ", max_right,
                "] with halo keys, got ", right);
  }
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  check_optional(op, band_key_mask, "band_key_mask", q, at::kBool, {B, S}, "(B, S)");
  check_optional(op, side_mask, "side_mask", q, at::kBool, {B, G}, "(B, G)");
  check_optional(op, query_block, "query_block", q, at::kInt, {B, S}, "(B, S)");
  TORCH_CHECK(!side_bias.has_value() || query_block.has_value(), op, ": query_block is required with side_bias");
  check_optional(op, band_bias, "band_bias", q, std::nullopt, {H, left + right + 1}, "(H, left + right + 1)");
  check_optional(op, side_bias, "side_bias", q, std::nullopt, {H, 2 * G + 1}, "(H, 2G + 1)");
  check_dropout_args(op, q, drop, HR, key_ranges, side_ranges);
  if (index.side_only) {  // no band keys: nothing may describe them
    TORCH_CHECK(!band_key_mask.has_value() && !band_bias.has_value() && !key_ranges.has_value(), op,
                ": band_key_mask / band_bias / key_ranges must be None with side_only (no band keys), got a tensor");
    TORCH_CHECK(indexed_g < 0 && !halo.k.has_value(), op,
                ": side_index / halo_k must be None with side_only, got a tensor");
    TORCH_CHECK(drop.offset == 0, op, ": dropout_offset must be 0 with side_only, got ", drop.offset);
  }
  // Per-row key ranges: read by computed offsets (b * S + i) * 2, so contiguous.
  for (const auto& [t, name] : {std::pair{&key_ranges, "key_ranges"}, std::pair{&side_ranges, "side_ranges"}}) {
    check_optional(op, *t, name, q, at::kInt, {B, S, 2}, "(B, S, 2)");
    if (t->has_value()) contiguous(op, **t, name);
  }
  return {B, S, H, D, G, HL, HR};
}

// The side keys' gradient destinations (SplitArgs): both or neither, never with side_index; (B / C, S', H, D) like
// q, element pairs 4-byte aligned (the dK/dV epilogue's pair stores).
void check_into_args(const char* op, const SplitArgs& split, const Dims& d, const at::Tensor& q,
                     const OptTensor& side_index) {
  TORCH_CHECK(split.dsk_into.has_value() == split.dsv_into.has_value(), op,
              ": dside_k_into and dside_v_into must be given together, got ", given(split.dsk_into), " and ",
              given(split.dsv_into));
  if (!split.dsk_into.has_value()) return;
  TORCH_CHECK(!side_index.has_value(), op, ": dside_k_into must be None with side_index, got a tensor");
  for (const auto& [t, name] : {std::pair{&*split.dsk_into, "dside_k_into"}, std::pair{&*split.dsv_into,
                                                                                       "dside_v_into"}}) {
    same_device(op, *t, name, q, "q");
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), op, ": ", name, " must have q's dtype ", q.scalar_type(),
                ", got ", t->scalar_type());
    const bool batches = t->dim() == 4 && (t->size(0) == 0 ? d.B == 0 : d.B % t->size(0) == 0);
    TORCH_CHECK(batches && t->size(2) == d.H && t->size(3) == d.D && t->sizes() == split.dsk_into->sizes() &&
                    t->size(1) < (int64_t(1) << 31),
                op, ": ", name, " must have shape (B / C, S', H, D) with C dividing B = ", d.B, ", H = ", d.H,
                ", D = ", d.D, ", S' < 2^31, like dside_k_into, got ", t->sizes());
    last_dim_contiguous(op, *t, name);
    bool aligned = reinterpret_cast<uintptr_t>(t->data_ptr()) % 4 == 0;
    for (int i = 0; i < 3; ++i) aligned = aligned && t->stride(i) % 2 == 0;
    TORCH_CHECK(aligned, op, ": ", name, " must keep element pairs 4-byte aligned (an aligned base, even strides), ",
                "got strides ", t->strides());
  }
}

Dims check_bwd_args(const char* op, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                    const at::Tensor& v,
                    const at::Tensor& side_k, const at::Tensor& side_v, const at::Tensor& out, const at::Tensor& lse,
                    const OptTensor& band_key_mask, const OptTensor& side_mask, const OptTensor& query_block,
                    const OptTensor& band_bias, const OptTensor& side_bias, int64_t left, int64_t right,
                    double scale, const DropoutArgs& drop, const OptTensor& key_ranges,
                    const OptTensor& side_ranges, const HaloArgs& halo, const OptTensor& dlse,
                    const OptTensor& side_index, bool side_only, const SplitArgs& split,
                    const OptTensor& query_index) {
  const OptTensor no_query_mask;
  const Dims d = check_fwd_args(op, q, k, v, side_k, side_v, band_key_mask, side_mask, query_block, band_bias,
                                side_bias, left, right, scale, drop, key_ranges, side_ranges, halo,
                                {side_index, no_query_mask, false, side_only, query_index});
  // Like q (read at the rows query_index names, when given).
  check_operand(op, dout, "dout", q, q.size(1), "(B, S, H, D)");
  check_operand(op, out, "out", q, q.size(1), "(B, S, H, D)");
  same_device(op, lse, "lse", q, "q");
  dtype_is(op, lse, "lse", at::kFloat);
  TORCH_CHECK(split.lse_split >= 1 && split.lse_split <= 65535 && d.B % split.lse_split == 0, op,
              ": lse_split must be in [1, 65535] and divide q's B = ", d.B, ", got ", split.lse_split);
  shape_is(op, lse, "lse", {d.B / split.lse_split, d.H, d.S}, "(B / lse_split, H, S)");
  check_optional(op, dlse, "dlse", q, at::kFloat, {d.B, d.H, d.S}, "(B, H, S)");
  TORCH_CHECK(!dlse.has_value() || split.lse_split == 1, op, ": dlse must be None with lse_split > 1, got ",
              "a tensor with lse_split = ", split.lse_split);
  check_into_args(op, split, d, q, side_index);
  // The delta kernel runs kDeltaRowsPerCta (b, s, h) rows per CTA on a 1-D grid (launch.h).
  TORCH_CHECK(d.B * d.S * d.H <= kDeltaRowsPerCta * std::numeric_limits<int32_t>::max(), op,
              ": q's B * S * H must be <= ", kDeltaRowsPerCta, " * (2^31 - 1) (CUDA grid limit), got ",
              d.B * d.S * d.H);
  return d;
}

// cp.async moves 16-byte chunks: the base and every row start must be 16-byte aligned (8 elements).
bool aligned_for_cp_async(const at::Tensor& t) {
  if (t.numel() == 0) return true;
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int d = 0; d < t.dim() - 1; ++d) {
    if (t.size(d) > 1 && t.stride(d) % 8 != 0) return false;
  }
  return true;
}

// A checked operand, copied (dense) only if its strides break the 16-byte rule.
at::Tensor loadable(const at::Tensor& t) { return aligned_for_cp_async(t) ? t : t.clone(at::MemoryFormat::Contiguous); }

OptTensor contiguous(const OptTensor& t) { return t ? OptTensor(t->contiguous()) : std::nullopt; }

// The TableKind of a bias table of this dtype (the finish kernel writes its gradient in it), or -1 (float64 and others:
// a float32 copy is read, and the gradient is written in float32 and cast).
int table_kind(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kTableF32;
    case at::kHalf: return kTableF16;
    case at::kBFloat16: return kTableBF16;
    default: return -1;
  }
}

// A bias table as the kernels get it: dense, in its dtype when it has a TableKind (float32 read in place; a 16-bit one
// converted to float32 by longattn's kernels, bias_tables.h), else a dense float32 copy.
OptTensor bias_table(const OptTensor& t) {
  if (!t) return std::nullopt;
  return table_kind(t->scalar_type()) < 0 ? t->to(at::kFloat).contiguous() : t->contiguous();
}

// The gradient of a bias table: allocated in the dtype the finish kernel writes (the table's, or float32 for the
// others, cast after it).
at::Tensor table_grad(const at::Tensor& table) {
  const at::ScalarType t = table.scalar_type();
  return at::empty(table.sizes(), table.options().dtype(table_kind(t) >= 0 ? t : at::kFloat));
}

Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

int floor_div(int64_t a, int64_t b) { return static_cast<int>(a >= 0 ? a / b : -((-a + b - 1) / b)); }

// The input half of the params, from checked arguments. Tensors that had to be copied or converted are
// kept alive in `keep`.
using Prepared = BandSideCall;

Prepared prepare(const Dims& d, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                 const at::Tensor& sk_in, const at::Tensor& sv_in, const OptTensor& band_key_mask,
                 const OptTensor& side_mask, const OptTensor& query_block, const OptTensor& band_bias,
                 const OptTensor& side_bias, int64_t left, int64_t right, double scale, const DropoutArgs& drop,
                 const OptTensor& key_ranges, const OptTensor& side_ranges, const HaloArgs& halo,
                 const IndexArgs& index) {
  Prepared r;
  const at::Tensor q = loadable(q_in), k = loadable(k_in), v = loadable(v_in);
  const at::Tensor sk = loadable(sk_in), sv = loadable(sv_in);
  const OptTensor bkm = contiguous(band_key_mask), sm = contiguous(side_mask);
  const OptTensor bb = bias_table(band_bias), sb = bias_table(side_bias);
  const OptTensor qb = side_bias ? contiguous(query_block) : std::nullopt;  // only read with side_bias
  r.keep = {q, k, v, sk, sv};
  for (const auto* t : {&bkm, &sm, &bb, &sb, &qb})
    if (t->has_value()) r.keep.push_back(**t);

  BandSideParams& p = r.p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.side_k = sk.data_ptr();
  p.side_v = sv.data_ptr();
  p.q_st = strides_of(q);
  p.k_st = strides_of(k);
  p.v_st = strides_of(v);
  p.sk_st = strides_of(sk);
  p.sv_st = strides_of(sv);
  p.band_key_mask = bkm ? reinterpret_cast<const uint8_t*>(bkm->data_ptr<bool>()) : nullptr;
  p.side_mask = sm ? reinterpret_cast<const uint8_t*>(sm->data_ptr<bool>()) : nullptr;
  p.query_block = qb ? qb->data_ptr<int32_t>() : nullptr;
  p.band_bias_kind = bb ? table_kind(bb->scalar_type()) : kTableF32;
  p.side_bias_kind = sb ? table_kind(sb->scalar_type()) : kTableF32;
  // 16-bit tables: the float32 workspace the conversion (forward launch / delta kernel) fills and the tile kernels
  // read, one stream-ordered allocation for both (no host sync, no ATen cast).
  const bool band16 = bb && p.band_bias_kind != kTableF32, side16 = sb && p.side_bias_kind != kTableF32;
  const int64_t n_band16 = band16 ? d.H * (left + right + 1) : 0, n_side16 = side16 ? d.H * (2 * d.G + 1) : 0;
  float* workspace = nullptr;
  if (band16 || side16) {
    const at::Tensor ws = at::empty({n_band16 + n_side16}, q.options().dtype(at::kFloat));
    r.keep.push_back(ws);
    workspace = ws.data_ptr<float>();
  }
  p.band_bias = band16 ? workspace : bb ? bb->data_ptr<float>() : nullptr;
  p.side_bias = side16 ? workspace + n_band16 : sb ? sb->data_ptr<float>() : nullptr;
  p.band_bias_in = band16 ? bb->data_ptr() : nullptr;
  p.side_bias_in = side16 ? sb->data_ptr() : nullptr;
  // Checked contiguous int32 (B, S, 2): read in place; nullptr selects the kernels without ranges.
  p.key_ranges = key_ranges ? key_ranges->data_ptr<int32_t>() : nullptr;
  p.side_ranges = side_ranges ? side_ranges->data_ptr<int32_t>() : nullptr;
  // Longformer's band pass: side_index (checked (B, G) int64, unit last stride) selects the kIndexed kernels.
  // (With G = 0 the epilogue's row masks still need those kernels: dispatch_flags also looks at them.)
  if (index.side_index) {
    p.side_index = d.G > 0 ? index.side_index->data_ptr<int64_t>() : nullptr;
    p.side_index_stride = index.side_index->stride(0);
    p.query_mask = index.query_mask ? reinterpret_cast<const uint8_t*>(index.query_mask->data_ptr<bool>()) : nullptr;
    p.band_rows_only = index.band_rows_only;
  }
  // Longformer's global rows read in place: checked (B_q, G) int64, unit last stride; B_q divides the op's B.
  if (index.query_index) {
    p.query_index = index.query_index->data_ptr<int64_t>();
    p.query_index_stride = index.query_index->stride(0);
    p.query_split = static_cast<int>(std::max<int64_t>(d.B / std::max<int64_t>(q.size(0), 1), 1));
    p.query_tokens = static_cast<int>(q.size(1));
  }
  p.B = d.B;
  p.S = d.S;
  p.H = d.H;
  p.G = d.G;
  p.D = d.D;
  p.left = left;
  p.right = right;
  p.band_width = left + right + 1;
  p.scale = static_cast<float>(scale);
  if (drop.p > 0.0) {  // else p.rng = nullptr: the dropout-free kernels
    const at::Tensor seed_offset = drop.rng->contiguous();
    r.keep.push_back(seed_offset);
    p.rng = seed_offset.data_ptr<int64_t>();
    p.drop_threshold = philox::keep_threshold(drop.p);
    p.drop_scale = static_cast<float>(1.0 / (1.0 - drop.p));
    p.drop_global_rows = drop.global_rows;
    p.drop_offset = static_cast<int>(drop.offset);  // != 0 selects the kHalo kernels (dispatch_flags)
  }
  // Halo keys: p.halo_k != nullptr selects the kHalo kernels; an empty halo (HL = HR = 0) changes nothing, so it
  // runs the plain ones. The dK/dV band CTAs cover the key tiles of [max(-HL, -left), min(S + HR, S + right)):
  // every key some query's window reaches (halo rows beyond get no gradient; band_side_bwd zero-fills them).
  p.band_tile0 = 0;
  p.n_band_tiles = index.side_only ? 0 : (d.S + kTile - 1) / kTile;  // side_only: no band CTA
  p.side_only = index.side_only;
  p.lse_split = 1;
  if (d.HL + d.HR > 0) {
    const at::Tensor hk = loadable(*halo.k), hv = loadable(*halo.v);
    r.keep.push_back(hk);
    r.keep.push_back(hv);
    p.halo_k = hk.data_ptr();
    p.halo_v = hv.data_ptr();
    p.hk_st = strides_of(hk);
    p.hv_st = strides_of(hv);
    p.halo_mask = halo.mask ? reinterpret_cast<const uint8_t*>(halo.mask->data_ptr<bool>()) : nullptr;  // contiguous
    p.halo_left = d.HL;
    p.halo_right = d.HR;
    const int64_t key_lo = std::max(-d.HL, -left), key_hi = std::min(d.S + d.HR, d.S + right) - 1;
    p.band_tile0 = floor_div(key_lo, kTile);
    p.n_band_tiles = floor_div(key_hi, kTile) - p.band_tile0 + 1;
  }
  return r;
}

// Whether the dK/dV band CTAs write every halo row (else the rows no window reaches are zero-filled first).
bool band_tiles_cover_halo(const BandSideParams& p, const Dims& d) {
  return int64_t(p.band_tile0) * kTile <= -d.HL && int64_t(p.band_tile0 + p.n_band_tiles) * kTile >= d.S + d.HR;
}

std::tuple<at::Tensor, at::Tensor> band_side_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 const at::Tensor& side_k, const at::Tensor& side_v,
                                                 const OptTensor& band_key_mask, const OptTensor& side_mask,
                                                 const OptTensor& query_block, const OptTensor& band_bias,
                                                 const OptTensor& side_bias, int64_t left, int64_t right,
                                                 double scale, double dropout_p, const OptTensor& rng,
                                                 bool dropout_global_rows, const OptTensor& key_ranges,
                                                 const OptTensor& side_ranges, const OptTensor& halo_k,
                                                 const OptTensor& halo_v, const OptTensor& halo_mask,
                                                 int64_t halo_left, int64_t dropout_offset,
                                                 const OptTensor& side_index, const OptTensor& query_mask,
                                                 bool band_rows_only, bool side_only, const OptTensor& query_index) {
  const HaloArgs halo{halo_k, halo_v, halo_mask, halo_left};
  const DropoutArgs drop{dropout_p, rng, dropout_global_rows, dropout_offset};
  const IndexArgs index{side_index, query_mask, band_rows_only, side_only, query_index};
  const Dims d = check_fwd_args(kFwd, q, k, v, side_k, side_v, band_key_mask, side_mask, query_block, band_bias,
                                side_bias, left, right, scale, drop, key_ranges, side_ranges, halo, index);
  on_cuda(kFwd, q, "q");
  const c10::cuda::CUDAGuard guard(q.device());
  Prepared r = prepare(d, q, k, v, side_k, side_v, band_key_mask, side_mask, query_block, band_bias, side_bias,
                       left, right, scale, drop, key_ranges, side_ranges, halo, index);
  BandSideParams& p = r.p;
  at::Tensor out = at::empty({p.B, p.S, p.H, p.D}, q.options());
  at::Tensor lse = at::empty({p.B, p.H, p.S}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  if (side_only && p.G == 0) {  // no key at all (and the kernels' walk is never empty without ranges)
    out.zero_();
    lse.fill_(std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  C10_CUDA_CHECK(run_band_side_fwd(p, q.scalar_type() == at::kBFloat16, c10::cuda::getCurrentCUDAStream()));
  return {out, lse};
}

// (dq, dk, dv, dside_k, dside_v, dband_bias, dside_bias, dhalo_k, dhalo_v)
using BwdGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                            at::Tensor, at::Tensor>;

// band_side_bwd's params and outputs after its checks, before its launches (launch = false: nothing to launch, the
// outputs are final). Scratch tensors (delta, the partial buffers, copies) are kept alive in call.keep.
struct BwdCall {
  Prepared call;
  BwdGrads grads;
  bool launch;
};

BwdCall prepare_bwd(const Dims& d, const at::Tensor& dout_in, const at::Tensor& q, const at::Tensor& k,
                    const at::Tensor& v, const at::Tensor& side_k, const at::Tensor& side_v, const at::Tensor& out_in,
                    const at::Tensor& lse_in, const OptTensor& band_key_mask, const OptTensor& side_mask,
                    const OptTensor& query_block, const OptTensor& band_bias, const OptTensor& side_bias,
                    int64_t left, int64_t right, double scale, double dropout_p, const OptTensor& rng,
                    bool dropout_global_rows, const OptTensor& key_ranges, const OptTensor& side_ranges,
                    const OptTensor& halo_k, const OptTensor& halo_v, const OptTensor& halo_mask,
                    int64_t halo_left, const OptTensor& dlse_in, int64_t dropout_offset,
                    const OptTensor& side_index, bool side_only, int64_t lse_split,
                    const OptTensor& dside_k_into, const OptTensor& dside_v_into, const OptTensor& query_index) {
  const HaloArgs halo{halo_k, halo_v, halo_mask, halo_left};
  const DropoutArgs drop{dropout_p, rng, dropout_global_rows, dropout_offset};
  const OptTensor no_query_mask;
  Prepared r = prepare(d, q, k, v, side_k, side_v, band_key_mask, side_mask, query_block, band_bias, side_bias,
                       left, right, scale, drop, key_ranges, side_ranges, halo,
                       {side_index, no_query_mask, false, side_only, query_index});
  BandSideParams& p = r.p;
  const at::Tensor dout = loadable(dout_in);
  const at::Tensor out = loadable(out_in);
  const at::Tensor lse = lse_in.contiguous();

  const auto opts = q.options();
  const auto fopts = opts.dtype(at::kFloat);
  at::Tensor dq = at::empty({p.B, p.S, p.H, p.D}, opts);
  // side_only: no band keys, so no dk / dv (empty, like the side-key gradients that go elsewhere).
  at::Tensor dk = side_only ? q.new_empty({0}) : at::empty_like(dq);
  at::Tensor dv = side_only ? q.new_empty({0}) : at::empty_like(dq);
  at::Tensor dbb = band_bias ? at::Tensor() : q.new_empty({0});
  at::Tensor dsb = side_bias ? at::Tensor() : q.new_empty({0});
  // Halo-key gradients ((0,) without halo keys); rows outside the dK/dV CTAs' tiles (no window reaches them) and
  // all rows when nothing runs are zeros.
  at::Tensor dhk = q.new_empty({0}), dhv = q.new_empty({0});
  if (halo_k) {
    const std::vector<int64_t> shape{d.B, d.HL + d.HR, d.H, d.D};
    const bool written = dq.numel() != 0 && band_tiles_cover_halo(p, d);
    dhk = written ? at::empty(shape, opts) : at::zeros(shape, opts);
    dhv = written ? at::empty(shape, opts) : at::zeros(shape, opts);
  }
  const bool into = dside_k_into.has_value();
  if (dq.numel() == 0 || (side_only && p.G == 0)) {  // nothing attends anything: zero gradients, nothing added
    dq.zero_();
    // With side_index the side keys' gradients are in dk / dv (zeros here), with dside_*_into in those (nothing to
    // add), and dside_k / dside_v are empty.
    at::Tensor dside = side_index || into ? q.new_empty({0}) : at::zeros({p.B, p.G, p.H, p.D}, opts);
    if (band_bias) dbb = at::zeros_like(*band_bias, at::MemoryFormat::Contiguous);
    if (side_bias) dsb = at::zeros_like(*side_bias, at::MemoryFormat::Contiguous);
    return {std::move(r), {dq, dk, dv, dside, dside.clone(), dbb, dsb, dhk, dhv}, false};
  }

  // Side-key tiles get split over chunks of query tiles (float32 partials, summed by the finish kernel) so that few
  // side keys still fill the GPU; a chunk is never shorter than a band CTA's walk, which would only add partial
  // traffic without shortening the critical path. The global rows (side_only) take one chunk: their queries are a few
  // slots (a query tile or so) against many key tiles (all S tokens over the splits), which fill the GPU on their own;
  // each side-key row then has one owner CTA, which writes it (dside_*_into: adds it) in its epilogue, with no
  // (B, S, H, D) float32 partials (2 x 384 MiB at S = 131072, H = 12, D = 64).
  const int64_t n_query_tiles = (p.S + kTile - 1) / kTile;
  const int64_t n_side_tiles = (p.G + kTile - 1) / kTile;
  int64_t chunks = 1;
  p.side_chunk_tiles = static_cast<int>(n_query_tiles);
  if (n_side_tiles > 0 && !side_only) {
    int sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, q.get_device()));
    const int64_t occupancy_chunks = (2 * sms + n_side_tiles * p.B * p.H - 1) / (n_side_tiles * p.B * p.H);
    const int64_t band_walk = (p.left + p.right) / kTile + 2;
    const int64_t chunk_tiles = std::max(band_walk, (n_query_tiles + occupancy_chunks - 1) / occupancy_chunks);
    p.side_chunk_tiles = std::min(chunk_tiles, n_query_tiles);
    chunks = (n_query_tiles + p.side_chunk_tiles - 1) / p.side_chunk_tiles;
  }
  p.side_chunks = chunks;
  // Partials except for the global rows (side_only: one chunk, the side CTA's epilogue writes its rows; the other
  // callers keep the partials + finish path, and their dK/dV instantiations keep their registers).
  at::Tensor dsk_part, dsv_part;
  if (n_side_tiles > 0 && !side_only) {
    dsk_part = at::empty({chunks, p.B, p.G, p.H, p.D}, fopts);
    dsv_part = at::empty_like(dsk_part);
  }
  // The side keys' gradients, unless added into dk / dv (side_index) or dside_*_into.
  const bool returns_side = !side_index && !into;
  at::Tensor dsk = returns_side ? at::empty({p.B, p.G, p.H, p.D}, opts) : q.new_empty({0});
  at::Tensor dsv = returns_side ? at::empty_like(dsk) : q.new_empty({0});
  // Bias partials: one row per key CTA, accumulated in place by that CTA, zeroed by the delta kernel (no fill launch).
  // Size
  // B*H*n_band_tiles*(L+R+1) floats for the band table (n_band_tiles = ceil(S/64) without halo keys; e.g. 3 MB for
  // LongT5 r=127, S=16384, B*H=12).
  at::Tensor dbb_part, dsb_part;
  if (band_bias) {
    dbb_part = at::empty({p.B, p.H, p.n_band_tiles, p.band_width}, fopts);
    dbb = table_grad(*band_bias);
  }
  if (side_bias) {
    dsb_part = at::empty({p.B, p.H, n_side_tiles * chunks, 2 * p.G + 1}, fopts);
    dsb = table_grad(*side_bias);
  }
  at::Tensor delta = at::empty({p.B, p.H, p.S}, fopts);

  p.dout = dout.data_ptr();
  p.do_st = strides_of(dout);
  p.o = out.data_ptr();
  p.o_st = strides_of(out);
  p.lse_in = lse.data_ptr<float>();
  at::Tensor lse_expanded;  // lse_split > 1: the delta kernel writes every batch row's lse here
  if (lse_split > 1) {
    lse_expanded = at::empty({p.B, p.H, p.S}, fopts);
    p.lse_merged = lse.data_ptr<float>();
    p.lse_expanded = lse_expanded.data_ptr<float>();
    p.lse_in = p.lse_expanded;
  }
  p.delta = delta.data_ptr<float>();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.dsk_partial = dsk_part.defined() ? dsk_part.data_ptr<float>() : nullptr;
  p.dsv_partial = dsv_part.defined() ? dsv_part.data_ptr<float>() : nullptr;
  p.dside_k = returns_side ? dsk.data_ptr() : nullptr;
  p.dside_v = returns_side ? dsv.data_ptr() : nullptr;
  p.dband_bias_partial = band_bias ? dbb_part.data_ptr<float>() : nullptr;
  p.dside_bias_partial = side_bias ? dsb_part.data_ptr<float>() : nullptr;
  p.dband_bias = band_bias ? dbb.data_ptr() : nullptr;
  p.dside_bias = side_bias ? dsb.data_ptr() : nullptr;
  p.dhalo_k = p.halo_k != nullptr ? dhk.data_ptr() : nullptr;
  p.dhalo_v = p.halo_k != nullptr ? dhv.data_ptr() : nullptr;
  const OptTensor dlse = contiguous(dlse_in);
  p.dlse = dlse ? dlse->data_ptr<float>() : nullptr;
  p.lse_split = static_cast<int>(lse_split);
  if (into) {
    p.dside_k_into = dside_k_into->data_ptr();
    p.dside_v_into = dside_v_into->data_ptr();
    p.dsk_into_st = strides_of(*dside_k_into);
    p.dsv_into_st = strides_of(*dside_v_into);
    p.into_split = static_cast<int>(d.B / dside_k_into->size(0));  // >= 1: B > 0 here
    p.into_rows = static_cast<int>(dside_k_into->size(1));
  }

  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&dout, &out, &lse, &delta, &lse_expanded,
                                                                       &dsk_part, &dsv_part, &dbb_part, &dsb_part})
    if (t->defined()) r.keep.push_back(*t);
  if (dlse) r.keep.push_back(*dlse);
  return {std::move(r), {dq, dk, dv, dsk, dsv, dbb, dsb, dhk, dhv}, true};
}

BwdGrads band_side_bwd(const at::Tensor& dout_in, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const at::Tensor& side_k, const at::Tensor& side_v, const at::Tensor& out_in,
                       const at::Tensor& lse_in, const OptTensor& band_key_mask, const OptTensor& side_mask,
                       const OptTensor& query_block, const OptTensor& band_bias, const OptTensor& side_bias,
                       int64_t left, int64_t right, double scale, double dropout_p, const OptTensor& rng,
                       bool dropout_global_rows, const OptTensor& key_ranges, const OptTensor& side_ranges,
                       const OptTensor& halo_k, const OptTensor& halo_v, const OptTensor& halo_mask,
                       int64_t halo_left, const OptTensor& dlse_in, int64_t dropout_offset,
                       const OptTensor& side_index, bool side_only, int64_t lse_split,
                       const OptTensor& dside_k_into, const OptTensor& dside_v_into, const OptTensor& query_index) {
  const HaloArgs halo{halo_k, halo_v, halo_mask, halo_left};
  const DropoutArgs drop{dropout_p, rng, dropout_global_rows, dropout_offset};
  const SplitArgs split{lse_split, dside_k_into, dside_v_into};
  const Dims d = check_bwd_args(kBwd, dout_in, q, k, v, side_k, side_v, out_in, lse_in, band_key_mask, side_mask,
                                query_block, band_bias, side_bias, left, right, scale, drop, key_ranges,
                                side_ranges, halo, dlse_in, side_index, side_only, split, query_index);
  on_cuda(kBwd, q, "q");
  const c10::cuda::CUDAGuard guard(q.device());
  BwdCall c = prepare_bwd(d, dout_in, q, k, v, side_k, side_v, out_in, lse_in, band_key_mask, side_mask, query_block,
                          band_bias, side_bias, left, right, scale, dropout_p, rng, dropout_global_rows, key_ranges,
                          side_ranges, halo_k, halo_v, halo_mask, halo_left, dlse_in, dropout_offset, side_index,
                          side_only, lse_split, dside_k_into, dside_v_into, query_index);
  if (!c.launch) return c.grads;
  at::Tensor& dbb = std::get<5>(c.grads);
  at::Tensor& dsb = std::get<6>(c.grads);
  const BandSideParams& p = c.call.p;
  const bool bf16 = q.scalar_type() == at::kBFloat16;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(run_band_side_bwd_delta(p, bf16, stream));
  C10_CUDA_CHECK(run_band_side_bwd_dq(p, bf16, stream));
  C10_CUDA_CHECK(run_band_side_bwd_dkdv(p, bf16, stream));
  // What the partials owe (side keys over chunks, into their rows; the bias tables over key CTAs), in one launch
  // after the dK/dV kernel (stream order), in a fixed order: deterministic, no ATen sum, cast or scatter.
  C10_CUDA_CHECK(run_band_side_bwd_finish(p, bf16, stream));
  if (band_bias && dbb.scalar_type() != band_bias->scalar_type()) dbb = dbb.to(band_bias->scalar_type());
  if (side_bias && dsb.scalar_type() != side_bias->scalar_type()) dsb = dsb.to(side_bias->scalar_type());
  return c.grads;
}

// CPU: the same checks, so bad arguments are reported identically (and testable without a GPU), then
// NotImplementedError.
std::tuple<at::Tensor, at::Tensor> band_side_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     const at::Tensor& side_k, const at::Tensor& side_v,
                                                     const OptTensor& band_key_mask, const OptTensor& side_mask,
                                                     const OptTensor& query_block, const OptTensor& band_bias,
                                                     const OptTensor& side_bias, int64_t left, int64_t right,
                                                     double scale, double dropout_p, const OptTensor& rng,
                                                     bool dropout_global_rows, const OptTensor& key_ranges,
                                                     const OptTensor& side_ranges, const OptTensor& halo_k,
                                                     const OptTensor& halo_v, const OptTensor& halo_mask,
                                                     int64_t halo_left, int64_t dropout_offset,
                                                     const OptTensor& side_index, const OptTensor& query_mask,
                                                     bool band_rows_only, bool side_only,
                                                     const OptTensor& query_index) {
  check_fwd_args(kFwd, q, k, v, side_k, side_v, band_key_mask, side_mask, query_block, band_bias, side_bias, left,
                 right, scale, {dropout_p, rng, dropout_global_rows, dropout_offset}, key_ranges, side_ranges,
                 {halo_k, halo_v, halo_mask, halo_left},
                 {side_index, query_mask, band_rows_only, side_only, query_index});
  needs_cuda(kFwd, q);
}

BwdGrads band_side_bwd_cpu(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const at::Tensor& side_k, const at::Tensor& side_v, const at::Tensor& out,
                           const at::Tensor& lse, const OptTensor& band_key_mask, const OptTensor& side_mask,
                           const OptTensor& query_block, const OptTensor& band_bias, const OptTensor& side_bias,
                           int64_t left, int64_t right, double scale, double dropout_p, const OptTensor& rng,
                           bool dropout_global_rows, const OptTensor& key_ranges, const OptTensor& side_ranges,
                           const OptTensor& halo_k, const OptTensor& halo_v, const OptTensor& halo_mask,
                           int64_t halo_left, const OptTensor& dlse, int64_t dropout_offset,
                           const OptTensor& side_index, bool side_only, int64_t lse_split,
                           const OptTensor& dside_k_into, const OptTensor& dside_v_into,
                           const OptTensor& query_index) {
  check_bwd_args(kBwd, dout, q, k, v, side_k, side_v, out, lse, band_key_mask, side_mask, query_block, band_bias,
                 side_bias, left, right, scale, {dropout_p, rng, dropout_global_rows, dropout_offset}, key_ranges,
                 side_ranges, {halo_k, halo_v, halo_mask, halo_left}, dlse, side_index, side_only,
                 {lse_split, dside_k_into, dside_v_into}, query_index);
  needs_cuda(kBwd, q);
}

}  // namespace

BandSideDims check_band_side_pass(const char* op, const BandSidePass& a) {
  const OptTensor none;
  return check_fwd_args(op, a.q, a.k, a.v, a.side_k, a.side_v, a.band_key_mask, a.side_mask, none, none, none, a.left,
                        a.right, a.scale, {0.0, none, false, 0}, a.key_ranges, a.side_ranges, {none, none, none, 0},
                        {a.side_index, a.query_mask, a.band_rows_only, a.side_only, a.query_index});
}

BandSideCall prepare_band_side_pass(const BandSideDims& d, const BandSidePass& a) {
  const OptTensor none;
  return prepare(d, a.q, a.k, a.v, a.side_k, a.side_v, a.band_key_mask, a.side_mask, none, none, none, a.left, a.right,
                 a.scale, {0.0, none, false, 0}, a.key_ranges, a.side_ranges, {none, none, none, 0},
                 {a.side_index, a.query_mask, a.band_rows_only, a.side_only, a.query_index});
}

BandSideDims check_band_side_bwd_pass(const char* op, const BandSideBwdPass& a) {
  const OptTensor none;
  const BandSidePass& f = a.pass;
  return check_bwd_args(op, a.dout, f.q, f.k, f.v, f.side_k, f.side_v, a.out, a.lse, f.band_key_mask, f.side_mask, none,
                        none, none, f.left, f.right, f.scale, {0.0, none, false, 0}, f.key_ranges, f.side_ranges,
                        {none, none, none, 0}, none, f.side_index, f.side_only, {a.lse_split, a.dside_k_into,
                                                                                a.dside_v_into},
                        f.query_index);
}

BandSideBwdCall prepare_band_side_bwd_pass(const BandSideDims& d, const BandSideBwdPass& a) {
  const OptTensor none;
  const BandSidePass& f = a.pass;
  BwdCall c = prepare_bwd(d, a.dout, f.q, f.k, f.v, f.side_k, f.side_v, a.out, a.lse, f.band_key_mask, f.side_mask,
                          none, none, none, f.left, f.right, f.scale, 0.0, none, false, f.key_ranges, f.side_ranges,
                          none, none, none, 0, none, 0, f.side_index, f.side_only, a.lse_split, a.dside_k_into,
                          a.dside_v_into, f.query_index);
  const BwdGrads& g = c.grads;
  return {std::move(c.call), std::get<0>(g), std::get<1>(g), std::get<2>(g), std::get<3>(g), std::get<4>(g), c.launch};
}

TORCH_LIBRARY_IMPL(longattn, CUDA, m) {
  m.impl("cuda_band_side_fwd", &band_side_fwd);
  m.impl("cuda_band_side_bwd", &band_side_bwd);
}

TORCH_LIBRARY_IMPL(longattn, CPU, m) {
  m.impl("cuda_band_side_fwd", &band_side_fwd_cpu);
  m.impl("cuda_band_side_bwd", &band_side_bwd_cpu);
}

}  // namespace longattn
