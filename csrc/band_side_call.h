// One band + side pass as another raw op runs it inside its own launches (Longformer's fused forward and backward,
// longformer_fused_api.cpp / longformer_fused_bwd_api.cpp, run the band pass and the global rows' key splits in shared
// kernels): the checks and the params cuda_band_side_fwd / cuda_band_side_bwd (band_side_api.cpp) would run and build
// for the same arguments, without halo keys, dropout, bias tables or dlse. Host-only (ATen).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "band_side/params.h"

namespace longattn {

// A call's sizes after its checks: the op's batch rows B, rows per batch row S, heads H, head dim D, side keys G, halo
// keys.
struct BandSideDims {
  int64_t B, S, H, D, G;
  int64_t HL, HR;  // halo keys left / right of the local ones (0, 0 without a halo)
};

// cuda_band_side_fwd's arguments that Longformer's passes use (the others are None / 0 / False), by reference.
struct BandSidePass {
  const at::Tensor& q;
  const at::Tensor& k;
  const at::Tensor& v;
  const at::Tensor& side_k;
  const at::Tensor& side_v;
  const std::optional<at::Tensor>& band_key_mask;
  const std::optional<at::Tensor>& side_mask;
  int64_t left, right;
  double scale;
  const std::optional<at::Tensor>& key_ranges;
  const std::optional<at::Tensor>& side_ranges;
  const std::optional<at::Tensor>& side_index;
  const std::optional<at::Tensor>& query_mask;
  bool band_rows_only, side_only;
  const std::optional<at::Tensor>& query_index;
};

// The input half of a pass's params (out / lse left for the caller) and the tensors they point into (copies made
// for cp.async alignment), to keep alive until the launch.
struct BandSideCall {
  BandSideParams p{};
  std::vector<at::Tensor> keep;
};

// cuda_band_side_fwd's checks of the pass (c10::Error naming `op` and the argument; metadata only, no CUDA call).
BandSideDims check_band_side_pass(const char* op, const BandSidePass& a);
// The params of a checked pass (any copies on q's device).
BandSideCall prepare_band_side_pass(const BandSideDims& d, const BandSidePass& a);

// cuda_band_side_bwd's arguments that Longformer's passes use: the pass's (query_mask None, band_rows_only False) and
// the backward's own.
struct BandSideBwdPass {
  const BandSidePass& pass;
  const at::Tensor& dout;
  const at::Tensor& out;
  const at::Tensor& lse;
  int64_t lse_split;
  const std::optional<at::Tensor>& dside_k_into;
  const std::optional<at::Tensor>& dside_v_into;
};

// A backward pass's params (delta, dq, dk, dv and the partial buffers allocated and set; scratch kept in call.keep) and
// its dq, dk, dv, dside_k, dside_v (cuda_band_side_bwd's first five outputs). launch = false: nothing to launch (an
// empty pass), the outputs are final.
struct BandSideBwdCall {
  BandSideCall call;
  at::Tensor dq, dk, dv, dside_k, dside_v;
  bool launch;
};

// cuda_band_side_bwd's checks of the pass (c10::Error naming `op` and the argument; metadata only, no CUDA call).
BandSideDims check_band_side_bwd_pass(const char* op, const BandSideBwdPass& a);
// Everything cuda_band_side_bwd does before its launches (allocations on q's device).
BandSideBwdCall prepare_band_side_bwd_pass(const BandSideDims& d, const BandSideBwdPass& a);

}  // namespace longattn
