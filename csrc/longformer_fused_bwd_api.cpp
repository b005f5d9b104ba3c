// Torch-facing API of Longformer's fused backward (csrc/longformer/fused_bwd.h): CUDA implementation of
// longattn::cuda_longformer_bwd (schema in extension.cpp), and a CPU implementation that runs the same checks and then
// says the op needs CUDA tensors.
//
// The op is _longformer.composed_backward without dropout in 4 launches (fused_bwd.h): the band pass's backward
// (cuda_band_side_bwd with side_index = pos, side_mask = used; q, k, v, dout, out (B, S, H, D), lse (B, H, S),
// band_rows (B, S) bool, per-row key_ranges / side_ranges as that op takes them) and the global rows'
// (cuda_band_side_bwd with side_only, query_index = pos over the key splits: the slots' rows of q_global (like q), or
// of q when None; split_k / split_v (B * C, n, H, D) the C splits' keys of k / v, or of the global projections;
// split_mask (B * C, n) bool or None, split_ranges (B * C, G, 2) int32 or None; lse_split = C on glse (B, H, G)), and
// their splits' dq rows summed into rows pos of dq, or of a new dq_global with q_global (cuda_longformer_rows_add).
// shared_kv: the splits are k / v's (the keys' dK/dV added into the band pass's dk / dv), else a separate projection's
// (returned per split, as cuda_band_side_bwd's dside_k / dside_v). Each pass is checked as cuda_band_side_bwd checks it
// (band_side_call.h; messages name this op). Returns (dq, dk, dv, dq_global, dsplit_k, dsplit_v): the first three (B,
// S, H, D), dq_global (B, S, H, D) with q_global, dsplit_k / dsplit_v (B * C, n, H, D) without shared_kv (else empty
// (0,)), all bitwise the composed path's. All checks run before any allocation or CUDA call; the allocations are the
// outputs and the two passes' scratch (delta, the side keys' partials, the splits' dq rows (B * C, G, H, D)).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>

#include "band_side/launch.h"
#include "band_side_call.h"
#include "common/arg_checks.h"
#include "longformer/fused_bwd.h"

namespace longattn {
namespace {

using namespace argcheck;
using OptTensor = std::optional<at::Tensor>;
using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

constexpr const char* kOp = "cuda_longformer_bwd";
constexpr int64_t kTile = 64;  // BandSideTraits::kBlockM: slots per split dQ CTA, queries per band dQ CTA

// The op's two passes (references to the op's arguments) and the launch's sizes, after the checks.
struct Checked {
  const BandSideBwdPass& band;
  const BandSideBwdPass& rows;
  BandSideDims band_dims, rows_dims;
  int64_t n_slot_tiles, n_lead;
  bool shared_kv;
  bool separate_q;
};

// Checks the op's arguments, then returns f(Checked): the CUDA and CPU implementations' common first step. The global
// rows' pass is checked without its dK/dV destinations (the band pass's dk / dv, which exist only after it is
// prepared: like q's (B, S, H, D), which that check asks of them).
template <typename F>
Grads with_checked_args(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& out, const at::Tensor& lse, const at::Tensor& glse,
                        const at::Tensor& band_rows, const at::Tensor& pos, const at::Tensor& used, int64_t left,
                        int64_t right, double scale, const at::Tensor& split_k, const at::Tensor& split_v,
                        const OptTensor& split_mask, const OptTensor& key_ranges, const OptTensor& side_ranges,
                        const OptTensor& split_ranges, const OptTensor& q_global, bool shared_kv, F&& f) {
  const OptTensor none, band_mask = band_rows, slots_used = used;
  const BandSidePass band{q, k, v, k, v, band_mask, slots_used, left, right, scale, key_ranges, side_ranges, pos,
                          none, false, false, none};
  const at::Tensor& qr = q_global.has_value() ? *q_global : q;  // the global rows' queries
  const BandSidePass rows{qr, qr, qr, split_k, split_v, none, split_mask, 0, 0, scale, none,
                          split_ranges, none, none, false, true, pos};
  TORCH_CHECK(split_k.dim() == 4, kOp, ": split_k must have shape (B * C, n, H, D), got ", split_k.sizes());
  // The key splits per batch row (their batch B * C against q's B; check_query_index reports a B that does not divide).
  const int64_t C = q.dim() == 4 && q.size(0) > 0 ? std::max<int64_t>(split_k.size(0) / q.size(0), 1) : 1;
  const BandSideBwdPass band_bwd{band, dout, out, lse, 1, none, none};
  const BandSideBwdPass rows_bwd{rows, dout, out, glse, C, none, none};
  const BandSideDims bd = check_band_side_bwd_pass(kOp, band_bwd);
  if (q_global.has_value()) {  // one kernel per launch: one dtype and head dim
    same_device(kOp, *q_global, "q_global", q, "q");
    TORCH_CHECK(q_global->scalar_type() == q.scalar_type() && q_global->sizes() == q.sizes(), kOp,
                ": q_global must have q's dtype and shape (", q.scalar_type(), ", ", q.sizes(), "), got (",
                q_global->scalar_type(), ", ", q_global->sizes(), ")");
  }
  const BandSideDims rd = check_band_side_bwd_pass(kOp, rows_bwd);
  const int64_t n_slot_tiles = (bd.G + kTile - 1) / kTile;
  const int64_t n_lead = n_slot_tiles * rd.B * bd.H;
  const int64_t dq_ctas = n_lead + (bd.S + kTile - 1) / kTile * bd.B * bd.H;
  TORCH_CHECK(dq_ctas < (int64_t(1) << 31), kOp, ": the dQ launch's ", dq_ctas,
              " CTAs exceed the grid limit 2^31 - 1 (q ", q.sizes(), ", split_k ", split_k.sizes(), ")");
  const int64_t slot_elements = bd.B * bd.G * bd.H * bd.D;  // the band finish's side-key pairs: half as many
  const int64_t last_x =
      rows_launch(shared_kv ? 0 : (slot_elements / 2 + 31) / 32, slot_elements, rd.B, rd.G, bd.H).grid_x();
  TORCH_CHECK(last_x < (int64_t(1) << 31), kOp, ": the last launch's grid x, ", last_x,
              ", exceeds the grid limit 2^31 - 1 (q ", q.sizes(), ", split_k ", split_k.sizes(), ")");
  const int64_t delta_rows = bd.B * bd.S * bd.H + rd.B * rd.S * rd.H;  // kDeltaRowsPerCta a CTA (launch.h)
  TORCH_CHECK(delta_rows <= kDeltaRowsPerCta * (std::numeric_limits<int32_t>::max() - 1), kOp,
              ": the delta launch's B * S * H + B * C * G * H rows must be <= ", kDeltaRowsPerCta,
              " * (2^31 - 2), got ", delta_rows);
  return f(Checked{band_bwd, rows_bwd, bd, rd, n_slot_tiles, n_lead, shared_kv, q_global.has_value()});
}

Grads launch(const Checked& c, const at::Tensor& q) {
  on_cuda(kOp, q, "q");
  const c10::cuda::CUDAGuard guard(q.device());
  const BandSideDims& d = c.band_dims;
  BandSideBwdCall band = prepare_band_side_bwd_pass(d, c.band);
  const OptTensor none, dk_into = band.dk, dv_into = band.dv;
  const BandSideBwdPass rows_into{c.rows.pass, c.rows.dout, c.rows.out, c.rows.lse, c.rows.lse_split,
                                  c.shared_kv ? dk_into : none, c.shared_kv ? dv_into : none};
  BandSideBwdCall rows = prepare_band_side_bwd_pass(c.rows_dims, rows_into);
  // The splits' dq sums go into dq, or into dq_global (zeroed by the delta launch).
  at::Tensor dq_global = c.separate_q ? at::empty_like(band.dq) : q.new_empty({0});
  const at::Tensor dsplit_k = c.shared_kv ? q.new_empty({0}) : rows.dside_k;
  const at::Tensor dsplit_v = c.shared_kv ? q.new_empty({0}) : rows.dside_v;
  const bool bf16 = q.scalar_type() == at::kBFloat16;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (!rows.launch) {  // no slot row or no key (G = 0, or an empty batch): the band pass alone, as cuda_band_side_bwd
    if (band.launch) {
      C10_CUDA_CHECK(run_band_side_bwd_delta(band.call.p, bf16, stream));
      C10_CUDA_CHECK(run_band_side_bwd_dq(band.call.p, bf16, stream));
      C10_CUDA_CHECK(run_band_side_bwd_dkdv(band.call.p, bf16, stream));
      C10_CUDA_CHECK(run_band_side_bwd_finish(band.call.p, bf16, stream));
    }
    if (c.separate_q) dq_global.zero_();
    return {band.dq, band.dk, band.dv, dq_global, dsplit_k, dsplit_v};
  }
  // rows launches => band launches: the global rows' batch, slots and heads are the band pass's B * C, G <= S and H.
  LongformerBwdParams p{};
  p.band = band.call.p;
  p.rows = rows.call.p;
  RowsParams& a = p.add;  // rows_add's params: the splits' dq rows into rows pos of dq
  a.B = static_cast<int>(d.B);
  a.S = static_cast<int>(d.S);
  a.G = static_cast<int>(d.G);
  a.H = static_cast<int>(d.H);
  a.D = static_cast<int>(d.D);
  a.C = static_cast<int>(c.rows_dims.B / d.B);  // B > 0 here
  a.dtype = bf16 ? RowsDType::kBFloat16 : RowsDType::kFloat16;
  a.parts = rows.dq.data_ptr();
  a.pos = p.band.side_index;  // the band pass's slots: pos, and used made contiguous (B, G)
  a.pos_sb = p.band.side_index_stride;
  a.used = p.band.side_mask;
  a.used_sb = d.G;
  a.rows = c.separate_q ? dq_global.data_ptr() : band.dq.data_ptr();
  if (c.separate_q) {  // zeroed by the delta launch as floats: B * S * H * D 2-byte elements, D even
    p.zero = static_cast<float*>(dq_global.data_ptr());
    p.zero_count = dq_global.numel() / 2;
  }
  a.rows_sb = d.S * d.H * d.D;
  a.rows_ss = d.H * d.D;
  a.rows_sh = d.D;
  p.n_slot_tiles = static_cast<int>(c.n_slot_tiles);
  p.n_query_tiles = static_cast<int>((d.S + kTile - 1) / kTile);
  p.n_lead = static_cast<int>(c.n_lead);
  C10_CUDA_CHECK(run_longformer_bwd(p, bf16, stream));
  return {band.dq, band.dk, band.dv, dq_global, dsplit_k, dsplit_v};
}

Grads longformer_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& out, const at::Tensor& lse, const at::Tensor& glse, const at::Tensor& band_rows,
                     const at::Tensor& pos, const at::Tensor& used, int64_t left, int64_t right, double scale,
                     const at::Tensor& split_k, const at::Tensor& split_v, const OptTensor& split_mask,
                     const OptTensor& key_ranges, const OptTensor& side_ranges, const OptTensor& split_ranges,
                     const OptTensor& q_global, bool shared_kv) {
  return with_checked_args(dout, q, k, v, out, lse, glse, band_rows, pos, used, left, right, scale, split_k, split_v,
                           split_mask, key_ranges, side_ranges, split_ranges, q_global, shared_kv,
                           [&](const Checked& c) { return launch(c, q); });
}

// CPU: the same checks, so bad arguments are reported identically (and testable without a GPU), then
// NotImplementedError.
Grads longformer_bwd_cpu(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& out, const at::Tensor& lse, const at::Tensor& glse,
                         const at::Tensor& band_rows, const at::Tensor& pos, const at::Tensor& used, int64_t left,
                         int64_t right, double scale, const at::Tensor& split_k, const at::Tensor& split_v,
                         const OptTensor& split_mask, const OptTensor& key_ranges, const OptTensor& side_ranges,
                         const OptTensor& split_ranges, const OptTensor& q_global, bool shared_kv) {
  return with_checked_args(dout, q, k, v, out, lse, glse, band_rows, pos, used, left, right, scale, split_k, split_v,
                           split_mask, key_ranges, side_ranges, split_ranges, q_global, shared_kv,
                           [&](const Checked&) -> Grads { needs_cuda(kOp, q); });
}

}  // namespace

TORCH_LIBRARY_IMPL(longattn, CUDA, m) { m.impl("cuda_longformer_bwd", &longformer_bwd); }

TORCH_LIBRARY_IMPL(longattn, CPU, m) { m.impl("cuda_longformer_bwd", &longformer_bwd_cpu); }

}  // namespace longattn
