// Torch-facing API of Longformer's fused forward (csrc/longformer/fused.h): CUDA implementation of
// longattn::cuda_longformer_fwd (schema in extension.cpp), and a CPU implementation that runs the same checks and then
// says the op needs CUDA tensors.
//
// The op is _longformer.composed_forward's steps 2 and 3 in one launch, after the slots kernel: the band pass
// (cuda_band_side_fwd with side_index = pos, side_mask = used, query_mask = key_padding_mask, band_rows_only; q, k, v
// (B, S, H, D), band_rows (B, S) bool, per-row key_ranges / side_ranges as that op takes them) and the global rows
// (cuda_band_side_fwd with side_only, query_index = pos over the key splits: q_global like q, split_k / split_v
// (B * C, n, H, D) the C splits' keys of k_global / v_global, split_mask (B * C, n) bool or None, split_ranges
// (B * C, G, 2) int32 or None), merged by log-sum-exp into the used slots' rows of out (cuda_longformer_rows_merge).
// Each pass is checked as cuda_band_side_fwd checks it (band_side_call.h; messages name this op); in addition
// q_global must be like q (one kernel, one dtype and head dim) and counter a contiguous int32 tensor of
// B * H * ceil(G / 64) zeros (cuda_longformer_global_slots' zero; the launch leaves them zero). pos / used must be
// global_slots' layout (the band CTAs leave the used slots' rows to the merge by that layout); any values are
// memory-safe. Returns (out (B, S, H, D), lse (B, H, S) float32, glse (B, H, G) float32), bitwise the composed path's.
// All checks run before any allocation or CUDA call; the only allocations are the outputs and the splits' partials
// ((B * C, G, H, D) and (B * C, H, G)).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "band_side_call.h"
#include "common/arg_checks.h"
#include "longformer/fused.h"

namespace longattn {
namespace {

using namespace argcheck;
using OptTensor = std::optional<at::Tensor>;
using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

constexpr const char* kOp = "cuda_longformer_fwd";
constexpr int64_t kTile = 64;  // BandSideTraits::kBlockM: slots per split CTA, queries per band CTA

// The op's two passes (references to the op's arguments) and the launch's sizes, after the checks.
struct Checked {
  const BandSidePass& band;
  const BandSidePass& rows;
  BandSideDims band_dims, rows_dims;
  int64_t n_slot_tiles, n_lead;
};

// Checks the op's arguments, then returns f(Checked): the CUDA and CPU implementations' common first step.
// (BandSidePass holds references, so band_rows / used are wrapped in optionals that live through f.)
template <typename F>
Outputs with_checked_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& band_rows,
                          const at::Tensor& pos, const at::Tensor& used, const OptTensor& key_padding_mask,
                          int64_t left, int64_t right, double scale, const at::Tensor& q_global,
                          const at::Tensor& split_k, const at::Tensor& split_v, const OptTensor& split_mask,
                          const at::Tensor& counter, const OptTensor& key_ranges, const OptTensor& side_ranges,
                          const OptTensor& split_ranges, F&& f) {
  const OptTensor none, band_mask = band_rows, slots_used = used;
  const BandSidePass band{q, k, v, k, v, band_mask, slots_used, left, right, scale, key_ranges, side_ranges, pos,
                          key_padding_mask, true, false, none};
  const BandSidePass rows{q_global, q_global, q_global, split_k, split_v, none, split_mask, 0, 0, scale, none,
                          split_ranges, none, none, false, true, pos};
  const BandSideDims bd = check_band_side_pass(kOp, band);
  same_device(kOp, q_global, "q_global", q, "q");
  TORCH_CHECK(q_global.scalar_type() == q.scalar_type() && q_global.sizes() == q.sizes(), kOp,
              ": q_global must have q's dtype and shape (", q.scalar_type(), ", ", q.sizes(), "), got (",
              q_global.scalar_type(), ", ", q_global.sizes(), ")");
  const BandSideDims rd = check_band_side_pass(kOp, rows);
  same_device(kOp, counter, "counter", q, "q");
  dtype_is(kOp, counter, "counter", at::kInt);
  contiguous(kOp, counter, "counter");
  const int64_t n_slot_tiles = (bd.G + kTile - 1) / kTile;
  TORCH_CHECK(counter.numel() == bd.B * bd.H * n_slot_tiles, kOp, ": counter must have B * H * ceil(G / 64) = ",
              bd.B * bd.H * n_slot_tiles, " elements, got ", counter.numel());
  const int64_t n_lead = n_slot_tiles * rd.B * bd.H;
  const int64_t ctas = n_lead + (bd.S + kTile - 1) / kTile * bd.B * bd.H;
  TORCH_CHECK(ctas < (int64_t(1) << 31), kOp, ": the launch's ", ctas, " CTAs exceed the grid limit 2^31 - 1 (q ",
              q.sizes(), ", split_k ", split_k.sizes(), ")");
  return f(Checked{band, rows, bd, rd, n_slot_tiles, n_lead});
}

Outputs launch(const Checked& c, const at::Tensor& q, at::Tensor& counter) {
  on_cuda(kOp, q, "q");
  const c10::cuda::CUDAGuard guard(q.device());
  const BandSideDims& d = c.band_dims;
  const int64_t BC = c.rows_dims.B;
  const auto fopts = q.options().dtype(at::kFloat);
  at::Tensor out = at::empty({d.B, d.S, d.H, d.D}, q.options());
  at::Tensor lse = at::empty({d.B, d.H, d.S}, fopts);
  at::Tensor glse = at::empty({d.B, d.H, d.G}, fopts);
  if (out.numel() == 0) return {out, lse, glse};  // then G <= S or H is 0 too: glse is empty
  at::Tensor parts = at::empty({BC, d.G, d.H, d.D}, q.options());
  at::Tensor lse_parts = at::empty({BC, d.H, d.G}, fopts);
  BandSideCall band = prepare_band_side_pass(d, c.band);
  BandSideCall rows = prepare_band_side_pass(c.rows_dims, c.rows);

  LongformerFwdParams p{};
  p.band = band.p;
  p.band.out = out.data_ptr();
  p.band.lse = lse.data_ptr<float>();
  p.rows = rows.p;
  p.rows.out = parts.data_ptr();
  p.rows.lse = lse_parts.data_ptr<float>();
  RowsParams& m = p.merge;
  m.B = static_cast<int>(d.B);
  m.S = static_cast<int>(d.S);
  m.G = static_cast<int>(d.G);
  m.H = static_cast<int>(d.H);
  m.D = static_cast<int>(d.D);
  m.C = static_cast<int>(BC / d.B);  // B > 0 here
  m.dtype = q.scalar_type() == at::kBFloat16 ? RowsDType::kBFloat16 : RowsDType::kFloat16;
  m.parts = parts.data_ptr();
  m.lse_parts = lse_parts.data_ptr<float>();
  m.pos = p.band.side_index;  // the band pass's slots: pos, and used made contiguous (B, G)
  m.pos_sb = p.band.side_index_stride;
  m.used = p.band.side_mask;
  m.used_sb = d.G;
  m.rows = out.data_ptr();
  m.rows_sb = d.S * d.H * d.D;
  m.rows_ss = d.H * d.D;
  m.rows_sh = d.D;
  m.glse = glse.data_ptr<float>();
  p.counter = counter.data_ptr<int32_t>();
  p.n_slot_tiles = static_cast<int>(c.n_slot_tiles);
  p.n_query_tiles = static_cast<int>((d.S + kTile - 1) / kTile);
  p.n_lead = static_cast<int>(c.n_lead);
  C10_CUDA_CHECK(run_longformer_fwd(p, q.scalar_type() == at::kBFloat16, c10::cuda::getCurrentCUDAStream()));
  return {out, lse, glse};
}

Outputs longformer_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& band_rows,
                       const at::Tensor& pos, const at::Tensor& used, const OptTensor& key_padding_mask, int64_t left,
                       int64_t right, double scale, const at::Tensor& q_global, const at::Tensor& split_k,
                       const at::Tensor& split_v, const OptTensor& split_mask, at::Tensor& counter,
                       const OptTensor& key_ranges, const OptTensor& side_ranges, const OptTensor& split_ranges) {
  return with_checked_args(q, k, v, band_rows, pos, used, key_padding_mask, left, right, scale, q_global, split_k,
                           split_v, split_mask, counter, key_ranges, side_ranges, split_ranges,
                           [&](const Checked& c) { return launch(c, q, counter); });
}

// CPU: the same checks, so bad arguments are reported identically (and testable without a GPU), then
// NotImplementedError.
Outputs longformer_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& band_rows,
                           const at::Tensor& pos, const at::Tensor& used, const OptTensor& key_padding_mask,
                           int64_t left, int64_t right, double scale, const at::Tensor& q_global,
                           const at::Tensor& split_k, const at::Tensor& split_v, const OptTensor& split_mask,
                           at::Tensor& counter, const OptTensor& key_ranges, const OptTensor& side_ranges,
                           const OptTensor& split_ranges) {
  return with_checked_args(q, k, v, band_rows, pos, used, key_padding_mask, left, right, scale, q_global, split_k,
                           split_v, split_mask, counter, key_ranges, side_ranges, split_ranges,
                           [&](const Checked&) -> Outputs { needs_cuda(kOp, q); });
}

}  // namespace

TORCH_LIBRARY_IMPL(longattn, CUDA, m) { m.impl("cuda_longformer_fwd", &longformer_fwd); }

TORCH_LIBRARY_IMPL(longattn, CPU, m) { m.impl("cuda_longformer_fwd", &longformer_fwd_cpu); }

}  // namespace longattn
