// Thin wrappers over the sm_80+ PTX instructions the attention kernels are built from:
// cp.async (global -> shared without a register round trip, zero-filling out-of-range rows),
// ldmatrix (8x8 b16 tiles into the exact fragment layout mma.sync expects) and
// mma.sync.m16n8k16 (fp16/bf16 in, fp32 accumulate).
//
// We write the PTX ourselves instead of pulling in CUTLASS/CuTe: torch does not ship those headers and
// the kernels only need these five instructions. Everything is guarded by __CUDA_ARCH__ >= 800 so the
// file still compiles if TORCH_CUDA_ARCH_LIST names an older arch; such a build traps at run time and
// the Python backend never dispatches there (it checks the compute capability first).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define LONGATTN_NO_SM80 1
#endif

namespace longattn {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy; when `valid` is false nothing is read and the 16 destination bytes are zeroed
// (src-size 0), which is how tiles hanging over the end of the sequence are padded with zeros.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
#ifndef LONGATTN_NO_SM80
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
               "r"(valid ? 16 : 0));
#else
  __trap();
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#ifndef LONGATTN_NO_SM80
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Wait until at most N committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifndef LONGATTN_NO_SM80
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
#ifndef LONGATTN_NO_SM80
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem)));
#else
  __trap();
#endif
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
#ifndef LONGATTN_NO_SM80
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem)));
#else
  __trap();
#endif
}

// c += a * b for one 16x8x16 tile. Fragment layouts (PTX ISA, "mma.m16n8k16"), lane = threadIdx % 32:
//   A (16x16, row): a0 (r, c..c+1), a1 (r+8, c..), a2 (r, c+8..), a3 (r+8, c+8..); r = lane/4, c = 2*(lane%4)
//   B (16x8, col):  b0 (k = 2*(lane%4).., n = lane/4), b1 (k + 8, n)
//   C (16x8):       c0,c1 (r, 2*(lane%4)..), c2,c3 (r + 8, 2*(lane%4)..)
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                  uint32_t b1) {
#ifndef LONGATTN_NO_SM80
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  __trap();
#endif
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
#ifndef LONGATTN_NO_SM80
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  __trap();
#endif
}

// Two floats -> one 32-bit register holding two T's (low half = x), the operand format of mma.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float x, float y);

template <>
__device__ __forceinline__ uint32_t pack2<__half>(float x, float y) {
  __half2 h = __floats2half2_rn(x, y);
  return *reinterpret_cast<uint32_t*>(&h);
}

template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float x, float y) {
  __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
  return *reinterpret_cast<uint32_t*>(&h);
}

// One 32-bit register holding two T's (low half first) -> two floats: pack2's inverse.
template <typename T>
__device__ __forceinline__ float2 unpack2(uint32_t x);

template <>
__device__ __forceinline__ float2 unpack2<__half>(uint32_t x) {
  return __half22float2(*reinterpret_cast<const __half2*>(&x));
}

template <>
__device__ __forceinline__ float2 unpack2<__nv_bfloat16>(uint32_t x) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&x));
}

// threadIdx.x read by an instruction of its own: what is derived from it is not merged (CSE) with the same values
// derived from threadIdx.x elsewhere in the kernel, which would then stay live in registers in between (code run before
// a tile body's loop, see longformer/fused_bwd_rows.h).
__device__ __forceinline__ int thread_index_apart() {
  int t;
  asm volatile("mov.u32 %0, %%tid.x;" : "=r"(t));
  return t;
}

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }

}  // namespace longattn
