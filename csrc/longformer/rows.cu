// The global rows' key splits (rows.h): the forward's log-sum-exp merge written straight into the slots' rows of out,
// and the backward's sum of the splits' dq rows added into the slots' rows of dq. (The band op reads the slots' query,
// dout and out rows in place: no copy of them per split.)
//
// One CTA per slot (b, g) and kThreads elements of its row of H * D (grid.y: the row's chunks); each thread walks the C
// splits in split order (deterministic). The merge of one element is merge.h's merge_elements, which Longformer's fused
// forward (fused_fwd.h) runs in its last-arriving split CTA instead of this launch; the add of one element is
// merge.h's SplitRows, which Longformer's fused backward (fused_bwd.h) runs in its last launch.
// Traffic: the merge reads the C partial rows and lse; the add reads the C dq rows and updates G rows of dq: small
// beside the band op over the same (B * C, G, H, D) rows.
#include <algorithm>

#include "longformer/merge.h"

namespace longattn {
namespace {

constexpr int kThreads = 128;

__device__ __forceinline__ Slot slot_of(const RowsParams& p) {
  return slot_at(p, static_cast<int>(blockIdx.x / p.G), static_cast<int>(blockIdx.x % p.G));
}

// The CTAs of a slot (gridDim.y of them) share its H * D elements, one per thread while HD <= kThreads * gridDim.y.
__device__ __forceinline__ int first_element() { return blockIdx.y * kThreads + threadIdx.x; }

template <typename T>
__global__ void __launch_bounds__(kThreads) rows_merge_kernel(const RowsParams p) {
  const Slot slot = slot_of(p);
  for (int e = first_element(); e < p.H * p.D; e += kThreads * gridDim.y) merge_elements<T>(p, slot, e / p.D, e % p.D);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) rows_add_kernel(const RowsParams p) {
  const Slot slot = slot_of(p);
  if (!slot.write) return;  // unused slots' dq rows are 0 (glse = +inf); bad positions are skipped
  const int HD = p.H * p.D;
  const SplitRows<T> rows(p, slot);
  for (int e = first_element(); e < HD; e += kThreads * gridDim.y) rows.add(p, e);
}

template <template <typename> class Kernel>
cudaError_t launch(const RowsParams& p, cudaStream_t stream) {
  if (p.B == 0 || p.G == 0) return cudaSuccess;  // a zero-sized grid is a launch error; nothing to do
  // One CTA per slot and kThreads elements of its row: enough CTAs for one slot (B = G = 1) to fill several SMs.
  const int64_t per_slot = std::min<int64_t>(((int64_t)p.H * p.D + kThreads - 1) / kThreads, 65535);
  const dim3 grid(static_cast<unsigned>((int64_t)p.B * p.G), static_cast<unsigned>(std::max<int64_t>(per_slot, 1)));
  switch (p.dtype) {
    case RowsDType::kFloat32: Kernel<float>::launch(grid, p, stream); break;
    case RowsDType::kFloat16: Kernel<__half>::launch(grid, p, stream); break;
    case RowsDType::kBFloat16: Kernel<__nv_bfloat16>::launch(grid, p, stream); break;
  }
  return cudaGetLastError();
}

template <typename T>
struct Merge {
  static void launch(dim3 grid, const RowsParams& p, cudaStream_t stream) {
    rows_merge_kernel<T><<<grid, kThreads, 0, stream>>>(p);
  }
};

template <typename T>
struct Add {
  static void launch(dim3 grid, const RowsParams& p, cudaStream_t stream) {
    rows_add_kernel<T><<<grid, kThreads, 0, stream>>>(p);
  }
};

}  // namespace

cudaError_t run_rows_merge(const RowsParams& p, cudaStream_t stream) { return launch<Merge>(p, stream); }

cudaError_t run_rows_add(const RowsParams& p, cudaStream_t stream) { return launch<Add>(p, stream); }

}  // namespace longattn
