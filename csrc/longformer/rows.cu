// The global rows' key splits (rows.h): the forward's log-sum-exp merge written straight into the slots' rows of out,
// and the backward's sum of the splits' dq rows added into the slots' rows of dq. (The band op reads the slots' query,
// dout and out rows in place: no copy of them per split.)
//
// One CTA per slot (b, g) and kThreads elements of its row of H * D (grid.y: the row's chunks); each thread walks the C
// splits in split order (deterministic). The merge is _longformer.KeySplits.merge's formula in float32:
//   finite_c = lse_c, or -inf for an empty split (lse_c = +inf); top = max_c finite_c; w_c = exp(finite_c - top)
//   (top -> 0 when every split is empty); total = sum_c w_c;
//   row = sum_c w_c out_c / total, glse = top + log(total); no key at all (total = 0): row 0, glse = +inf.
// Unused slots get glse = +inf and leave out untouched; used slots whose pos is outside [0, S) write nothing.
// Traffic: the merge reads the C partial rows and lse; the add reads the C dq rows and updates G rows of dq: small
// beside the band op over the same (B * C, G, H, D) rows.
#include <algorithm>

#include "common/ptx.h"
#include "longformer/rows.h"

namespace longattn {
namespace {

constexpr int kThreads = 128;
constexpr float kInf = __builtin_huge_valf();

struct Slot {
  int b, g;
  bool used, in_range, write;  // the slot holds a global; its position is a row of `rows`; both
  int64_t row_offset;          // element offset of row pos[b, g], head 0, of `rows` (when in_range)
  int64_t part_offset;         // element offset of split 0's row of the slot in `parts`
};

__device__ __forceinline__ Slot slot_of(const RowsParams& p) {
  Slot s;
  s.b = static_cast<int>(blockIdx.x / p.G);
  s.g = static_cast<int>(blockIdx.x % p.G);
  s.used = p.used != nullptr && p.used[s.b * p.used_sb + s.g] != 0;
  const int64_t row = p.pos[s.b * p.pos_sb + s.g];
  s.in_range = row >= 0 && row < p.S;  // any index value is safe: out of range is never dereferenced
  s.write = s.used && s.in_range;
  s.row_offset = s.b * p.rows_sb + (s.in_range ? row : 0) * p.rows_ss;
  s.part_offset = ((int64_t)s.b * p.C * p.G + s.g) * p.H * p.D;
  return s;
}

// The CTAs of a slot (gridDim.y of them) share its H * D elements, one per thread while HD <= kThreads * gridDim.y.
__device__ __forceinline__ int first_element() { return blockIdx.y * kThreads + threadIdx.x; }

template <typename T>
__global__ void __launch_bounds__(kThreads) rows_merge_kernel(const RowsParams p) {
  const Slot slot = slot_of(p);
  const int HD = p.H * p.D;
  const int64_t split_stride = (int64_t)p.G * HD;  // parts: split c of the slot is c rows of (G, H, D) further
  const T* parts = reinterpret_cast<const T*>(p.parts) + slot.part_offset;
  T* rows = reinterpret_cast<T*>(p.rows) + slot.row_offset;
  for (int e = first_element(); e < HD; e += kThreads * gridDim.y) {
    const int h = e / p.D, d = e - h * p.D;
    float* glse = p.glse + ((int64_t)slot.b * p.H + h) * p.G + slot.g;
    if (!slot.used) {  // CTA-uniform
      if (d == 0) *glse = kInf;
      continue;
    }
    // lse_parts (B * C, H, G): split c of (b, h, g) at ((b * C + c) * H + h) * G + g.
    const float* lse = p.lse_parts + ((int64_t)slot.b * p.C * p.H + h) * p.G + slot.g;
    const int64_t lse_stride = (int64_t)p.H * p.G;
    float top = -kInf;
#pragma unroll 4
    for (int c = 0; c < p.C; ++c) {
      const float l = lse[c * lse_stride];
      if (l != kInf) top = fmaxf(top, l);
    }
    const float shift = top == -kInf ? 0.f : top;
    float total = 0.f, acc = 0.f;
    // Unrolled: independent loads in flight (C is up to S / SPLIT_KEYS).
#pragma unroll 4
    for (int c = 0; c < p.C; ++c) {
      const float l = lse[c * lse_stride];
      const float w = l == kInf ? 0.f : __expf(l - shift);
      total += w;
      if (slot.write) acc += w * to_float(parts[c * split_stride + e]);
    }
    const bool seen = total > 0.f;
    if (d == 0) *glse = seen ? top + __logf(total) : kInf;
    if (slot.write) rows[h * p.rows_sh + d] = from_float<T>(acc / (seen ? total : 1.f));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) rows_add_kernel(const RowsParams p) {
  const Slot slot = slot_of(p);
  if (!slot.write) return;  // unused slots' dq rows are 0 (glse = +inf); bad positions are skipped
  const int HD = p.H * p.D;
  const int64_t split_stride = (int64_t)p.G * HD;
  const T* parts = reinterpret_cast<const T*>(p.parts) + slot.part_offset;
  T* rows = reinterpret_cast<T*>(p.rows) + slot.row_offset;
  for (int e = first_element(); e < HD; e += kThreads * gridDim.y) {
    const int h = e / p.D, d = e - h * p.D;
    float acc = 0.f;
#pragma unroll 4
    for (int c = 0; c < p.C; ++c) acc += to_float(parts[c * split_stride + e]);
    T& dst = rows[h * p.rows_sh + d];
    dst = from_float<T>(to_float(dst) + acc);
  }
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
