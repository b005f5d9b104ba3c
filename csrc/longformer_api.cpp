// Torch-facing API of Longformer's glue kernels (csrc/longformer/rows.h): argument checks and allocation. CUDA
// implementations of longattn::cuda_longformer_global_slots / cuda_longformer_rows_merge / cuda_longformer_rows_add
// (schemas in extension.cpp; global_slots' optional `zero`: Longformer's fused forward's arrival counters, zeroed by
// the slots kernel), and CPU implementations that run the same checks and then say the ops need CUDA
// tensors.
//
// All checks run before any allocation or CUDA call. Strides: the masks of global_slots are read in place with any
// strides; out / dq (the rows written) need a dense last dim (their other strides are free), the slot positions and
// used flags a unit last stride; the split parts (outputs of the band op) must be contiguous. Values are not checked
// (a device sync): slot positions outside [0, S) are skipped by the kernels. rows_add's zero_fill zeroes dq
// (contiguous) with one memset before the add.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>

#include "common/arg_checks.h"
#include "longformer/rows.h"

namespace longattn {
namespace {

using namespace argcheck;
using OptTensor = std::optional<at::Tensor>;

constexpr const char* kSlots = "cuda_longformer_global_slots";
constexpr const char* kMerge = "cuda_longformer_rows_merge";
constexpr const char* kAdd = "cuda_longformer_rows_add";
constexpr int64_t kMaxInt = (int64_t(1) << 31) - 1;

// Slot positions and flags are read as rows of G entries (unit last stride; the row stride is free, as for
// _longformer.global_slots' slice of an argsort).
void unit_last_stride(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, op, ": ", name, " must have a unit last stride, got strides ",
              t.strides());
}

void check_slots_args(const at::Tensor& global_mask, const OptTensor& key_padding_mask, int64_t G,
                      const OptTensor& zero) {
  dtype_is(kSlots, global_mask, "global_mask", at::kBool);
  TORCH_CHECK(global_mask.dim() == 2, kSlots, ": global_mask must have shape (B, S), got ", global_mask.sizes());
  const int64_t B = global_mask.size(0), S = global_mask.size(1);
  // The kernel walks a row in 16384-token chunks with int positions.
  TORCH_CHECK(B <= kMaxInt && S <= kMaxInt - 32768, kSlots, ": global_mask's B and S must be < 2^31 - 32768, got ",
              global_mask.sizes());
  if (key_padding_mask.has_value()) {
    same_device(kSlots, *key_padding_mask, "key_padding_mask", global_mask, "global_mask");
    dtype_is(kSlots, *key_padding_mask, "key_padding_mask", at::kBool);
    shape_is(kSlots, *key_padding_mask, "key_padding_mask", {B, S}, "(B, S)");
  }
  TORCH_CHECK(G >= 0 && G <= S, kSlots, ": G must be in [0, S] = [0, ", S, "], got ", G);
  if (zero.has_value()) {
    same_device(kSlots, *zero, "zero", global_mask, "global_mask");
    dtype_is(kSlots, *zero, "zero", at::kInt);
    contiguous(kSlots, *zero, "zero");
    // The CTAs (B of them, S > 0) stride over it; with none running there must be nothing to zero.
    TORCH_CHECK(zero->numel() == 0 || (B > 0 && S > 0), kSlots, ": zero must be empty when B or S is 0, got ",
                zero->numel(), " elements");
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> global_slots(const at::Tensor& global_mask,
                                                            const OptTensor& key_padding_mask, int64_t G,
                                                            const OptTensor& zero) {
  check_slots_args(global_mask, key_padding_mask, G, zero);
  on_cuda(kSlots, global_mask, "global_mask");
  const c10::cuda::CUDAGuard guard(global_mask.device());
  const int64_t B = global_mask.size(0), S = global_mask.size(1);
  at::Tensor band_rows = at::empty({B, S}, global_mask.options());
  at::Tensor pos = at::empty({B, G}, global_mask.options().dtype(at::kLong));
  at::Tensor used = at::empty({B, G}, global_mask.options());
  SlotsParams p{};
  p.B = static_cast<int>(B);
  p.S = static_cast<int>(S);
  p.G = static_cast<int>(G);
  p.global_mask = reinterpret_cast<const uint8_t*>(global_mask.data_ptr<bool>());
  p.gm_sb = global_mask.stride(0);
  p.gm_ss = global_mask.stride(1);
  if (key_padding_mask.has_value()) {
    p.pad_mask = reinterpret_cast<const uint8_t*>(key_padding_mask->data_ptr<bool>());
    p.pm_sb = key_padding_mask->stride(0);
    p.pm_ss = key_padding_mask->stride(1);
  }
  p.band_rows = reinterpret_cast<uint8_t*>(band_rows.data_ptr<bool>());
  p.pos = pos.data_ptr<int64_t>();
  p.used = reinterpret_cast<uint8_t*>(used.data_ptr<bool>());
  if (zero.has_value()) {
    p.zero = zero->data_ptr<int32_t>();
    p.zero_count = zero->numel();
  }
  C10_CUDA_CHECK(run_global_slots(p, c10::cuda::getCurrentCUDAStream()));
  return {band_rows, pos, used};
}

// The checks shared by the merge and the add: `rows` (B, S, H, D) is written at rows pos of the used slots from
// `parts` (B * C, G, H, D). Returns the params' shape and pointer fields.
RowsParams check_rows_args(const char* op, const at::Tensor& parts, const char* parts_name, const at::Tensor& pos,
                           const at::Tensor& used, const at::Tensor& rows, const char* rows_name) {
  const auto dt = rows.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op, ": ", rows_name,
              " must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(rows.dim() == 4, op, ": ", rows_name, " must have shape (B, S, H, D), got ", rows.sizes());
  const int64_t B = rows.size(0), S = rows.size(1), H = rows.size(2), D = rows.size(3);
  TORCH_CHECK(S <= kMaxInt && H * D <= kMaxInt, op, ": ", rows_name, "'s S and H * D must be < 2^31, got ",
              rows.sizes());
  last_dim_contiguous(op, rows, rows_name);
  same_device(op, pos, "pos", rows, rows_name);
  dtype_is(op, pos, "pos", at::kLong);
  TORCH_CHECK(pos.dim() == 2 && pos.size(0) == B, op, ": pos must have shape (B, G) with B = ", B, ", got ",
              pos.sizes());
  const int64_t G = pos.size(1);
  TORCH_CHECK(B * G <= kMaxInt, op, ": pos's B * G must be < 2^31 (one CTA per slot), got ", pos.sizes());
  unit_last_stride(op, pos, "pos");
  same_device(op, used, "used", rows, rows_name);
  dtype_is(op, used, "used", at::kBool);
  shape_is(op, used, "used", {B, G}, "(B, G)");
  unit_last_stride(op, used, "used");
  same_device(op, parts, parts_name, rows, rows_name);
  TORCH_CHECK(parts.scalar_type() == dt, op, ": ", parts_name, " must have ", rows_name, "'s dtype ", dt, ", got ",
              parts.scalar_type());
  // C splits per batch row (B = 0: any multiple of nothing; C = 1).
  const int64_t C = B > 0 && parts.dim() == 4 && parts.size(0) % B == 0 ? std::max<int64_t>(parts.size(0) / B, 1) : 1;
  TORCH_CHECK(parts.dim() == 4 && parts.size(0) == B * C && parts.size(1) == G && parts.size(2) == H &&
                  parts.size(3) == D,
              op, ": ", parts_name, " must have shape (B * C, G, H, D) with B = ", B, ", C >= 1, G = ", G, ", H = ", H,
              ", D = ", D, ", got ", parts.sizes());
  TORCH_CHECK(C <= kMaxInt, op, ": ", parts_name, "'s split count C must be < 2^31, got ", C);
  contiguous(op, parts, parts_name);
  RowsParams p{};
  p.B = static_cast<int>(B);
  p.S = static_cast<int>(S);
  p.G = static_cast<int>(G);
  p.H = static_cast<int>(H);
  p.D = static_cast<int>(D);
  p.C = static_cast<int>(C);
  p.dtype = dt == at::kHalf ? RowsDType::kFloat16 : dt == at::kBFloat16 ? RowsDType::kBFloat16 : RowsDType::kFloat32;
  return p;
}

RowsParams check_merge_args(const at::Tensor& out_parts, const at::Tensor& lse_parts, const at::Tensor& pos,
                            const at::Tensor& used, const at::Tensor& out) {
  RowsParams p = check_rows_args(kMerge, out_parts, "out_parts", pos, used, out, "out");
  same_device(kMerge, lse_parts, "lse_parts", out, "out");
  dtype_is(kMerge, lse_parts, "lse_parts", at::kFloat);
  shape_is(kMerge, lse_parts, "lse_parts", {int64_t(p.B) * p.C, p.H, p.G}, "(B * C, H, G)");
  contiguous(kMerge, lse_parts, "lse_parts");
  return p;
}

// The pointer fields of the params, from checked arguments.
void point_at(RowsParams& p, const at::Tensor& parts, const at::Tensor& pos, const at::Tensor& used,
              const at::Tensor& rows) {
  p.parts = parts.data_ptr();
  p.pos = pos.data_ptr<int64_t>();
  p.pos_sb = pos.stride(0);
  p.used = reinterpret_cast<const uint8_t*>(used.data_ptr<bool>());
  p.used_sb = used.stride(0);
  p.rows = rows.data_ptr();
  p.rows_sb = rows.stride(0);
  p.rows_ss = rows.stride(1);
  p.rows_sh = rows.stride(2);
}

at::Tensor rows_merge(const at::Tensor& out_parts, const at::Tensor& lse_parts, const at::Tensor& pos,
                      const at::Tensor& used, at::Tensor& out) {
  RowsParams p = check_merge_args(out_parts, lse_parts, pos, used, out);
  on_cuda(kMerge, out, "out");
  const c10::cuda::CUDAGuard guard(out.device());
  at::Tensor glse = at::empty({p.B, p.H, p.G}, out.options().dtype(at::kFloat));
  if (p.H == 0 || p.D == 0) {  // no elements: no thread would write glse
    glse.fill_(std::numeric_limits<float>::infinity());
    return glse;
  }
  point_at(p, out_parts, pos, used, out);
  p.lse_parts = lse_parts.data_ptr<float>();
  p.glse = glse.data_ptr<float>();
  C10_CUDA_CHECK(run_rows_merge(p, c10::cuda::getCurrentCUDAStream()));
  return glse;
}

RowsParams check_add_args(const at::Tensor& dq_parts, const at::Tensor& pos, const at::Tensor& used,
                          const at::Tensor& dq, bool zero_fill) {
  RowsParams p = check_rows_args(kAdd, dq_parts, "dq_parts", pos, used, dq, "dq");
  if (zero_fill) contiguous(kAdd, dq, "dq");  // one memset
  return p;
}

void rows_add(const at::Tensor& dq_parts, const at::Tensor& pos, const at::Tensor& used, at::Tensor& dq,
              bool zero_fill) {
  RowsParams p = check_add_args(dq_parts, pos, used, dq, zero_fill);
  on_cuda(kAdd, dq, "dq");
  const c10::cuda::CUDAGuard guard(dq.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (zero_fill && dq.numel() > 0)
    C10_CUDA_CHECK(cudaMemsetAsync(dq.data_ptr(), 0, dq.numel() * dq.element_size(), stream));
  if (p.H == 0 || p.D == 0) return;
  point_at(p, dq_parts, pos, used, dq);
  C10_CUDA_CHECK(run_rows_add(p, stream));
}

// CPU: the same checks, so bad arguments are reported identically (and testable without a GPU), then
// NotImplementedError.
std::tuple<at::Tensor, at::Tensor, at::Tensor> global_slots_cpu(const at::Tensor& global_mask,
                                                                const OptTensor& key_padding_mask, int64_t G,
                                                                const OptTensor& zero) {
  check_slots_args(global_mask, key_padding_mask, G, zero);
  needs_cuda(kSlots, global_mask);
}

at::Tensor rows_merge_cpu(const at::Tensor& out_parts, const at::Tensor& lse_parts, const at::Tensor& pos,
                          const at::Tensor& used, at::Tensor& out) {
  check_merge_args(out_parts, lse_parts, pos, used, out);
  needs_cuda(kMerge, out);
}

void rows_add_cpu(const at::Tensor& dq_parts, const at::Tensor& pos, const at::Tensor& used, at::Tensor& dq,
                  bool zero_fill) {
  check_add_args(dq_parts, pos, used, dq, zero_fill);
  needs_cuda(kAdd, dq);
}

}  // namespace

TORCH_LIBRARY_IMPL(longattn, CUDA, m) {
  m.impl("cuda_longformer_global_slots", &global_slots);
  m.impl("cuda_longformer_rows_merge", &rows_merge);
  m.impl("cuda_longformer_rows_add", &rows_add);
}

TORCH_LIBRARY_IMPL(longattn, CPU, m) {
  m.impl("cuda_longformer_global_slots", &global_slots_cpu);
  m.impl("cuda_longformer_rows_merge", &rows_merge_cpu);
  m.impl("cuda_longformer_rows_add", &rows_add_cpu);
}

}  // namespace longattn
