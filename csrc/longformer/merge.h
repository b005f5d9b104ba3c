// The global rows' log-sum-exp merge of their key splits, per output element (rows.h), and the backward's sum of their
// dq rows (SplitRows, at the end). The merge is the body of rows_merge_kernel
// (rows.cu, after the split band op: one element a thread) and of the fused forward's last-arriving split CTA
// (fused_fwd.h, in the same launch: 16 bytes of a row a thread). _longformer.KeySplits.merge's formula in float32,
// the splits walked in split order:
//   finite_c = lse_c, or -inf for an empty split (lse_c = +inf); top = max_c finite_c; w_c = exp(finite_c - top)
//   (top -> 0 when every split is empty); total = sum_c w_c;
//   row = sum_c w_c out_c / total, glse = top + log(total); no key at all (total = 0): row 0, glse = +inf.
// Unused slots get glse = +inf and leave out untouched; used slots whose pos is outside [0, S) write nothing.
// The partials are read through L2 (ld.global.cg): in the fused forward other CTAs wrote them during the launch, and L1
// is not coherent; for rows_merge_kernel (written by an earlier launch) the values are the same.
#pragma once

#include "common/ptx.h"
#include "longformer/rows.h"

namespace longattn {

struct Slot {
  int b, g;
  bool used, in_range, write;  // the slot holds a global; its position is a row of `rows`; both
  int64_t row_offset;          // element offset of row pos[b, g], head 0, of `rows` (when in_range)
  int64_t part_offset;         // element offset of split 0's row of the slot in `parts`
};

__device__ __forceinline__ Slot slot_at(const RowsParams& p, int b, int g) {
  Slot s;
  s.b = b;
  s.g = g;
  s.used = p.used != nullptr && p.used[b * p.used_sb + g] != 0;
  const int64_t row = p.pos[b * p.pos_sb + g];
  s.in_range = row >= 0 && row < p.S;  // any index value is safe: out of range is never dereferenced
  s.write = s.used && s.in_range;
  s.row_offset = b * p.rows_sb + (s.in_range ? row : 0) * p.rows_ss;
  s.part_offset = ((int64_t)b * p.C * p.G + g) * p.H * p.D;
  return s;
}

// V elements of T as one load / store (V = 1: the element; else one 16-byte word), through L2 for the loads.
template <typename T, int V>
__device__ __forceinline__ void load_elements(const T* src, float (&x)[V]) {
  if constexpr (V == 1) {
    x[0] = to_float(__ldcg(src));
  } else {
    static_assert(V * sizeof(T) == 16, "one 16-byte word");
    const uint4 word = __ldcg(reinterpret_cast<const uint4*>(src));
    const T* e = reinterpret_cast<const T*>(&word);
#pragma unroll
    for (int v = 0; v < V; ++v) x[v] = to_float(e[v]);
  }
}

template <typename T, int V>
__device__ __forceinline__ void store_elements(T* dst, const float (&x)[V]) {
  if constexpr (V == 1) {
    *dst = from_float<T>(x[0]);
  } else {
    uint4 word;
    T* e = reinterpret_cast<T*>(&word);
#pragma unroll
    for (int v = 0; v < V; ++v) e[v] = from_float<T>(x[v]);
    *reinterpret_cast<uint4*>(dst) = word;
  }
}

// Elements (h, d0 .. d0 + V - 1) of slot `slot`: their row of `rows` (p.rows, dtype T) from the C splits' parts and
// lse, and (d0 = 0) its glse. V > 1 (the fused forward: d0 a multiple of V, the rows 16-byte aligned) shares the split
// weights between the V elements and reads V partials per load; each element's arithmetic is V = 1's, so the bits too.
template <typename T, int V = 1>
__device__ __forceinline__ void merge_elements(const RowsParams& p, const Slot& slot, int h, int d0) {
  constexpr float kInf = __builtin_huge_valf();
  float* glse = p.glse + ((int64_t)slot.b * p.H + h) * p.G + slot.g;
  if (!slot.used) {
    if (d0 == 0) *glse = kInf;
    return;
  }
  const int e = h * p.D + d0;
  const int64_t split_stride = (int64_t)p.G * p.H * p.D;  // parts: split c of the slot is c rows of (G, H, D) further
  const T* parts = reinterpret_cast<const T*>(p.parts) + slot.part_offset;
  // lse_parts (B * C, H, G): split c of (b, h, g) at ((b * C + c) * H + h) * G + g.
  const float* lse = p.lse_parts + ((int64_t)slot.b * p.C * p.H + h) * p.G + slot.g;
  const int64_t lse_stride = (int64_t)p.H * p.G;
  float top = -kInf;
#pragma unroll 4
  for (int c = 0; c < p.C; ++c) {
    const float l = __ldcg(lse + c * lse_stride);
    if (l != kInf) top = fmaxf(top, l);
  }
  const float shift = top == -kInf ? 0.f : top;
  float total = 0.f, acc[V];
#pragma unroll
  for (int v = 0; v < V; ++v) acc[v] = 0.f;
  // Unrolled: independent loads in flight (C is up to S / SPLIT_KEYS). Not for V > 1 (16-byte loads): in the fused
  // forward's kernel ptxas (CUDA 13.0, sm_90) then allocates 168 registers and spills at D = 64, against 150 and none.
  constexpr int kUnroll = V == 1 ? 4 : 1;
#pragma unroll kUnroll
  for (int c = 0; c < p.C; ++c) {
    const float l = __ldcg(lse + c * lse_stride);
    const float w = l == kInf ? 0.f : __expf(l - shift);
    total += w;
    if (slot.write) {
      float x[V];
      load_elements<T, V>(parts + c * split_stride + e, x);
#pragma unroll
      for (int v = 0; v < V; ++v) acc[v] = __fmaf_rn(w, x[v], acc[v]);  // one rounding in every kernel (glse's note)
    }
  }
  const bool seen = total > 0.f;
  // Roundings pinned (never contracted): this body is inlined into rows_merge_kernel and the fused forward, and
  // __logf(x) = lg2(x) * ln2 followed by the add is an FFMA in one kernel and not in another unless written so.
  if (d0 == 0) *glse = seen ? __fadd_rn(top, __fmul_rn(__log2f(total), kLn2)) : kInf;
  T* rows = reinterpret_cast<T*>(p.rows) + slot.row_offset;
  if (slot.write) {
#pragma unroll
    for (int v = 0; v < V; ++v) acc[v] = acc[v] / (seen ? total : 1.f);
    store_elements<T, V>(rows + h * p.rows_sh + d0, acc);
  }
}

// The backward's sum of a slot's split dq rows (slot.write: used, in range): element e = h * D + d of the C splits'
// rows (p.parts, dtype T), summed in split order in float32, added to its row of p.rows with one rounding. The body of
// rows_add_kernel (rows.cu, one slot a CTA: the pointers once, then its elements) and of Longformer's fused backward's
// last launch (fused_bwd_rows.h, one element a thread).
template <typename T>
struct SplitRows {
  const T* parts;  // split 0's row of the slot
  T* rows;         // the slot's row of p.rows
  int64_t split_stride;

  __device__ __forceinline__ SplitRows(const RowsParams& p, const Slot& slot)
      : parts(reinterpret_cast<const T*>(p.parts) + slot.part_offset),
        rows(reinterpret_cast<T*>(p.rows) + slot.row_offset),
        split_stride((int64_t)p.G * (p.H * p.D)) {}

  __device__ __forceinline__ void add(const RowsParams& p, int e) const {
    const int h = e / p.D, d = e - h * p.D;
    float acc = 0.f;
#pragma unroll 4
    for (int c = 0; c < p.C; ++c) acc += to_float(parts[c * split_stride + e]);
    T& dst = rows[h * p.rows_sh + d];
    dst = from_float<T>(to_float(dst) + acc);
  }
};

}  // namespace longattn
