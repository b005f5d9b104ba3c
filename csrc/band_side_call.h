// One band + side forward pass as another raw op runs it inside its own launch (Longformer's fused forward,
// longformer_fused_api.cpp, runs the band pass and the global rows' key splits in one kernel): the checks and the
// params cuda_band_side_fwd (band_side_api.cpp) would run and build for the same arguments, without halo keys, dropout
// or bias tables. Host-only (ATen).
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

}  // namespace longattn
