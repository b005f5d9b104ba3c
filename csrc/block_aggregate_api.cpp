// Torch-facing API of block aggregation: checks and allocation around the kernels. CUDA implementations of
// longattn::cuda_block_aggregate_fwd / cuda_block_aggregate_bwd (schemas in extension.cpp), and CPU
// implementations that run the same checks and then say the ops need CUDA tensors.
//
// Only the kernels do device work for ordinary inputs: the forward is 2 launches (the order kernel's stable
// counting sort of tokens by block id, then the aggregate kernel), the backward at most 3, and around them
// there are allocations (at::empty) only. All checks (check_fwd_args / check_bwd_args) run before any copy,
// allocation or CUDA call. Strides: x and dout must have a dense last dim (checked; their other strides are
// free), weight's stride is free; block_ids, sums and rstd are copied to the dense layout the kernels index
// only when they are not in it, and a weight only when it is not float32, float16 or bfloat16. Block ids are
// not range-checked (a device sync): ids outside [0, num_blocks) are dropped by construction (order.cu).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "block_aggregate/aggregate.h"
#include "common/arg_checks.h"

namespace longattn {
namespace {

using namespace argcheck;
using OptTensor = std::optional<at::Tensor>;

constexpr const char* kFwd = "cuda_block_aggregate_fwd";
constexpr const char* kBwd = "cuda_block_aggregate_bwd";

struct Dims {
  int64_t B, S, C, G;
};

Dims check_fwd_args(const char* op, const at::Tensor& x, const at::Tensor& block_ids, int64_t num_blocks,
                    const OptTensor& weight, double eps) {
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
              ": x must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(x.dim() == 3, op, ": x must have shape (B, S, C), got ", x.sizes());
  const int64_t B = x.size(0), S = x.size(1), C = x.size(2);
  TORCH_CHECK(B <= 65535, op, ": x's B must be <= 65535 (CUDA grid limit), got ", B);
  TORCH_CHECK(S < (int64_t(1) << 31) && C < (int64_t(1) << 31), op, ": x's S and C must be < 2^31, got S = ", S,
              ", C = ", C);
  last_dim_contiguous(op, x, "x");
  same_device(op, block_ids, "block_ids", x, "x");
  dtype_is(op, block_ids, "block_ids", at::kInt);
  shape_is(op, block_ids, "block_ids", {B, S}, "(B, S)");
  TORCH_CHECK(num_blocks >= 0 && num_blocks < (int64_t(1) << 31), op, ": num_blocks must be in [0, 2^31), got ",
              num_blocks);
  if (weight.has_value()) {
    same_device(op, *weight, "weight", x, "x");
    floating(op, *weight, "weight");
    shape_is(op, *weight, "weight", {C}, "(C,)");
  }
  TORCH_CHECK(std::isfinite(eps) && eps > 0, op, ": eps must be a finite positive float, got ", eps);
  return {B, S, C, num_blocks};
}

Dims check_bwd_args(const at::Tensor& dout, const at::Tensor& x, const at::Tensor& block_ids, int64_t num_blocks,
                    const OptTensor& weight, const at::Tensor& sums, const at::Tensor& rstd, double eps) {
  const Dims d = check_fwd_args(kBwd, x, block_ids, num_blocks, weight, eps);
  same_device(kBwd, dout, "dout", x, "x");
  TORCH_CHECK(dout.scalar_type() == x.scalar_type(), kBwd, ": dout must have x's dtype ", x.scalar_type(),
              ", got ", dout.scalar_type());
  shape_is(kBwd, dout, "dout", {d.B, d.G, d.C}, "(B, num_blocks, C)");
  last_dim_contiguous(kBwd, dout, "dout");
  // The forward's statistics: float32 always, shaped only with weight (without it they are empty and unread).
  same_device(kBwd, sums, "sums", x, "x");
  dtype_is(kBwd, sums, "sums", at::kFloat);
  same_device(kBwd, rstd, "rstd", x, "x");
  dtype_is(kBwd, rstd, "rstd", at::kFloat);
  if (weight.has_value()) {
    shape_is(kBwd, sums, "sums", {d.B, d.G, d.C}, "(B, num_blocks, C)");
    shape_is(kBwd, rstd, "rstd", {d.B, d.G}, "(B, num_blocks)");
  }
  return d;
}

// The kernels' dtype of x or weight: float32 for any dtype but float16 and bfloat16 (check_fwd_args lets only
// float32 through for x; `weight_tensor` converts the other weights).
AggDType agg_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return AggDType::kFloat16;
    case at::kBFloat16: return AggDType::kBFloat16;
    default: return AggDType::kFloat32;
  }
}

// The weight the kernels read: weight itself when float32, float16 or bfloat16 (any stride), else (float64, the
// float8 types) a float32 copy.
at::Tensor weight_tensor(const at::Tensor& weight) {
  const auto dt = weight.scalar_type();
  return dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 ? weight : weight.to(at::kFloat);
}

at::ScalarType scalar_type_of(AggDType dt) {
  switch (dt) {
    case AggDType::kFloat16: return at::kHalf;
    case AggDType::kBFloat16: return at::kBFloat16;
    default: return at::kFloat;
  }
}

// The input half of the params, from checked arguments. `keep` holds converted tensors alive.
AggregateParams prepare(const Dims& d, const at::Tensor& x, const at::Tensor& block_ids,
                        const OptTensor& weight, double eps, std::vector<at::Tensor>& keep) {
  const at::Tensor ids = block_ids.contiguous();
  keep = {x, ids};
  AggregateParams p{};
  p.B = d.B;
  p.S = d.S;
  p.C = d.C;
  p.G = d.G;
  p.dtype = agg_dtype(x);
  p.x = x.data_ptr();
  p.x_sb = x.stride(0);
  p.x_ss = x.stride(1);
  p.ids = ids.data_ptr<int32_t>();
  p.eps = static_cast<float>(eps);
  if (weight.has_value()) {
    const at::Tensor w = weight_tensor(*weight);
    keep.push_back(w);
    p.weight = w.data_ptr();
    p.w_s = w.stride(0);
    p.wdtype = agg_dtype(w);
  }
  return p;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_aggregate_fwd(const at::Tensor& x, const at::Tensor& block_ids,
                                                                   int64_t num_blocks, const OptTensor& weight,
                                                                   double eps) {
  const Dims d = check_fwd_args(kFwd, x, block_ids, num_blocks, weight, eps);
  on_cuda(kFwd, x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  std::vector<at::Tensor> keep;
  AggregateParams p = prepare(d, x, block_ids, weight, eps, keep);
  const auto fopts = x.options().dtype(at::kFloat);
  at::Tensor out = at::empty({p.B, p.G, p.C}, x.options());
  at::Tensor sums = weight ? at::empty({p.B, p.G, p.C}, fopts) : at::empty({0}, fopts);
  at::Tensor rstd = weight ? at::empty({p.B, p.G}, fopts) : at::empty({0}, fopts);
  if (out.numel() == 0) return {out, sums, rstd};
  if (p.S == 0) {  // no tokens: sums of nothing
    out.zero_();
    if (weight) {
      sums.zero_();
      rstd.fill_(1.0 / std::sqrt(eps));
    }
    return {out, sums, rstd};
  }
  // The order kernel's scratch: block g of row b is perm[b, seg[b, g] : seg[b, g + 1]] (aggregate.h).
  const at::Tensor perm = at::empty({p.B, p.S}, block_ids.options().dtype(at::kInt));
  const at::Tensor seg = at::empty({p.B, p.G + 1}, block_ids.options().dtype(at::kInt));
  p.perm = perm.data_ptr<int32_t>();
  p.seg = seg.data_ptr<int32_t>();
  p.out = out.data_ptr();
  p.sums = weight ? sums.data_ptr<float>() : nullptr;
  p.rstd = weight ? rstd.data_ptr<float>() : nullptr;
  C10_CUDA_CHECK(run_block_aggregate_fwd(p, c10::cuda::getCurrentCUDAStream()));
  return {out, sums, rstd};
}

std::tuple<at::Tensor, at::Tensor> block_aggregate_bwd(const at::Tensor& dout, const at::Tensor& x,
                                                       const at::Tensor& block_ids, int64_t num_blocks,
                                                       const OptTensor& weight, const at::Tensor& sums_in,
                                                       const at::Tensor& rstd_in, double eps) {
  const Dims d = check_bwd_args(dout, x, block_ids, num_blocks, weight, sums_in, rstd_in, eps);
  on_cuda(kBwd, x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  std::vector<at::Tensor> keep;
  AggregateParams p = prepare(d, x, block_ids, weight, eps, keep);
  const auto fopts = x.options().dtype(at::kFloat);
  at::Tensor dx = at::empty({p.B, p.S, p.C}, x.options());
  // dweight in the weight's dtype (float32 for the weights weight_tensor converts), every entry written.
  at::Tensor dweight = weight ? at::empty({p.C}, fopts.dtype(scalar_type_of(p.wdtype))) : x.new_empty({0});
  at::Tensor sums, rstd, dsums;
  if (weight) {
    sums = sums_in.contiguous();
    rstd = rstd_in.contiguous();
    dsums = at::empty({p.B, p.G, p.C}, fopts);
    p.sums_in = sums.data_ptr<float>();
    p.rstd_in = rstd.data_ptr<float>();
    p.dsums = dsums.data_ptr<float>();
    p.dweight = dweight.data_ptr();
  }
  if (dx.numel() > 0 || (weight && p.C > 0)) {
    p.dout = dout.data_ptr();
    p.do_sb = dout.numel() ? dout.stride(0) : 0;
    p.do_sg = dout.numel() ? dout.stride(1) : 0;
    p.dx = dx.data_ptr();
    C10_CUDA_CHECK(run_block_aggregate_bwd(p, c10::cuda::getCurrentCUDAStream()));
  }
  if (weight && dweight.scalar_type() != weight->scalar_type()) dweight = dweight.to(weight->scalar_type());
  return {dx, dweight};
}

// CPU: the same checks, so bad arguments are reported identically (and testable without a GPU), then
// NotImplementedError.
std::tuple<at::Tensor, at::Tensor, at::Tensor> block_aggregate_fwd_cpu(const at::Tensor& x,
                                                                       const at::Tensor& block_ids,
                                                                       int64_t num_blocks, const OptTensor& weight,
                                                                       double eps) {
  check_fwd_args(kFwd, x, block_ids, num_blocks, weight, eps);
  needs_cuda(kFwd, x);
}

std::tuple<at::Tensor, at::Tensor> block_aggregate_bwd_cpu(const at::Tensor& dout, const at::Tensor& x,
                                                           const at::Tensor& block_ids, int64_t num_blocks,
                                                           const OptTensor& weight, const at::Tensor& sums,
                                                           const at::Tensor& rstd, double eps) {
  check_bwd_args(dout, x, block_ids, num_blocks, weight, sums, rstd, eps);
  needs_cuda(kBwd, x);
}

}  // namespace

TORCH_LIBRARY_IMPL(longattn, CUDA, m) {
  m.impl("cuda_block_aggregate_fwd", &block_aggregate_fwd);
  m.impl("cuda_block_aggregate_bwd", &block_aggregate_bwd);
}

TORCH_LIBRARY_IMPL(longattn, CPU, m) {
  m.impl("cuda_block_aggregate_fwd", &block_aggregate_fwd_cpu);
  m.impl("cuda_block_aggregate_bwd", &block_aggregate_bwd_cpu);
}

}  // namespace longattn
