// Torch-facing API of block aggregation: checks, the stable sort of tokens by block id that makes the
// kernels' segment sums deterministic, and allocation. CUDA implementations of
// longattn::cuda_block_aggregate_fwd / cuda_block_aggregate_bwd (schemas in extension.cpp).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "block_aggregate/aggregate.h"

namespace longattn {
namespace {

AggDType agg_dtype(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return AggDType::kFloat32;
    case at::kHalf: return AggDType::kFloat16;
    case at::kBFloat16: return AggDType::kBFloat16;
    default: TORCH_CHECK(false, "block_aggregate takes float32 / float16 / bfloat16, got ", x.scalar_type());
  }
}

// Shared checks; fills the input half of the params. `keep` holds converted tensors alive.
AggregateParams prepare(const at::Tensor& x_in, const at::Tensor& block_ids, int64_t num_blocks,
                        const std::optional<at::Tensor>& weight, double eps, std::vector<at::Tensor>& keep) {
  TORCH_CHECK(x_in.is_cuda(), "x must be a CUDA tensor");
  TORCH_CHECK(x_in.dim() == 3, "x must be (B, S, C), got ", x_in.sizes());
  const int64_t B = x_in.size(0), S = x_in.size(1), C = x_in.size(2);
  TORCH_CHECK(num_blocks >= 0 && num_blocks < (int64_t(1) << 31), "num_blocks out of range: ", num_blocks);
  TORCH_CHECK(B <= 65535, "B must be <= 65535 (grid limit)");
  TORCH_CHECK(S < (int64_t(1) << 31) && C < (int64_t(1) << 31), "S and C must fit in int32");
  TORCH_CHECK(block_ids.device() == x_in.device() && block_ids.scalar_type() == at::kInt && block_ids.dim() == 2 &&
                  block_ids.size(0) == B && block_ids.size(1) == S,
              "block_ids must be int32 (B, S) on ", x_in.device());
  const at::Tensor x = (x_in.numel() == 0 || x_in.stride(2) == 1) ? x_in : x_in.contiguous();
  const at::Tensor ids = block_ids.contiguous();
  keep = {x, ids};
  AggregateParams p{};
  p.B = B;
  p.S = S;
  p.C = C;
  p.G = num_blocks;
  p.dtype = agg_dtype(x);
  p.x = x.data_ptr();
  p.x_sb = x.stride(0);
  p.x_ss = x.stride(1);
  p.ids = ids.data_ptr<int32_t>();
  p.eps = static_cast<float>(eps);
  if (weight.has_value()) {
    TORCH_CHECK(weight->device() == x.device() && at::isFloatingType(weight->scalar_type()) && weight->dim() == 1 &&
                    weight->size(0) == C,
                "weight must be a float (C,) tensor on ", x.device());
    const at::Tensor w = weight->to(at::kFloat).contiguous();
    keep.push_back(w);
    p.weight = w.data_ptr<float>();
  }
  return p;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_aggregate_fwd(const at::Tensor& x, const at::Tensor& block_ids,
                                                                   int64_t num_blocks,
                                                                   const std::optional<at::Tensor>& weight,
                                                                   double eps) {
  const c10::cuda::CUDAGuard guard(x.device());
  std::vector<at::Tensor> keep;
  AggregateParams p = prepare(x, block_ids, num_blocks, weight, eps, keep);
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
  // Stable sort of token indices by block id: block g's tokens are perm[seg[g] : seg[g+1]] in sequence
  // order. Ids outside [0, G) (dropped or invalid) sort before seg[0] or after seg[G] and are never read.
  const auto sorted = at::sort(keep[1], /*stable=*/true, /*dim=*/1, /*descending=*/false);
  const at::Tensor& sorted_ids = std::get<0>(sorted);
  const at::Tensor perm = std::get<1>(sorted).contiguous();
  const at::Tensor bounds = at::arange(p.G + 1, keep[1].options()).expand({p.B, p.G + 1}).contiguous();
  const at::Tensor seg = at::searchsorted(sorted_ids, bounds).contiguous();  // int64, side="left"
  p.perm = perm.data_ptr<int64_t>();
  p.seg = seg.data_ptr<int64_t>();
  p.out = out.data_ptr();
  p.sums = weight ? sums.data_ptr<float>() : nullptr;
  p.rstd = weight ? rstd.data_ptr<float>() : nullptr;
  C10_CUDA_CHECK(run_block_aggregate_fwd(p, c10::cuda::getCurrentCUDAStream()));
  return {out, sums, rstd};
}

std::tuple<at::Tensor, at::Tensor> block_aggregate_bwd(const at::Tensor& dout_in, const at::Tensor& x,
                                                       const at::Tensor& block_ids, int64_t num_blocks,
                                                       const std::optional<at::Tensor>& weight,
                                                       const at::Tensor& sums_in, const at::Tensor& rstd_in,
                                                       double eps) {
  const c10::cuda::CUDAGuard guard(x.device());
  std::vector<at::Tensor> keep;
  AggregateParams p = prepare(x, block_ids, num_blocks, weight, eps, keep);
  TORCH_CHECK(dout_in.device() == x.device() && dout_in.scalar_type() == x.scalar_type() && dout_in.dim() == 3 &&
                  dout_in.size(0) == p.B && dout_in.size(1) == p.G && dout_in.size(2) == p.C,
              "dout must be (B, num_blocks, C) in x's dtype on ", x.device());
  const at::Tensor dout = (dout_in.numel() == 0 || dout_in.stride(2) == 1) ? dout_in : dout_in.contiguous();
  const auto fopts = x.options().dtype(at::kFloat);
  at::Tensor dx = at::empty({p.B, p.S, p.C}, x.options());
  at::Tensor dweight = weight ? at::zeros({p.C}, fopts) : x.new_empty({0});
  at::Tensor sums, rstd, dsums;
  if (weight) {
    TORCH_CHECK(sums_in.device() == x.device() && sums_in.scalar_type() == at::kFloat && sums_in.dim() == 3 &&
                    sums_in.size(0) == p.B && sums_in.size(1) == p.G && sums_in.size(2) == p.C,
                "sums must be float32 (B, num_blocks, C)");
    TORCH_CHECK(rstd_in.device() == x.device() && rstd_in.scalar_type() == at::kFloat && rstd_in.dim() == 2 &&
                    rstd_in.size(0) == p.B && rstd_in.size(1) == p.G,
                "rstd must be float32 (B, num_blocks)");
    sums = sums_in.contiguous();
    rstd = rstd_in.contiguous();
    dsums = at::empty({p.B, p.G, p.C}, fopts);
    p.sums_in = sums.data_ptr<float>();
    p.rstd_in = rstd.data_ptr<float>();
    p.dsums = dsums.data_ptr<float>();
    p.dweight = dweight.data_ptr<float>();
  }
  if (dx.numel() > 0 || (weight && p.C > 0)) {
    p.dout = dout.data_ptr();
    p.do_sb = dout.numel() ? dout.stride(0) : 0;
    p.do_sg = dout.numel() ? dout.stride(1) : 0;
    p.dx = dx.data_ptr();
    C10_CUDA_CHECK(run_block_aggregate_bwd(p, c10::cuda::getCurrentCUDAStream()));
  }
  if (weight) dweight = dweight.to(weight->scalar_type());
  return {dx, dweight};
}

}  // namespace

TORCH_LIBRARY_IMPL(longattn, CUDA, m) {
  m.impl("cuda_block_aggregate_fwd", &block_aggregate_fwd);
  m.impl("cuda_block_aggregate_bwd", &block_aggregate_bwd);
}

}  // namespace longattn
