// Argument-check helpers of the raw ops (torch.ops.longattn.cuda_*), shared by their CUDA and CPU
// implementations.
//
// They read metadata only (device, dtype, sizes, strides), never data, and make no CUDA call, so the same
// checks run on CPU, meta and CUDA tensors, and every one fires before an implementation copies, allocates
// or launches anything. Each failure is a c10::Error (RuntimeError in Python) whose message starts with the
// op, names the argument and says what was expected and what was given, e.g.
//   "cuda_band_side_fwd: band_bias must have shape (H, left + right + 1) = [2, 30], got [2, 29]".
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>

namespace longattn::argcheck {

inline void same_device(const char* op, const at::Tensor& t, const char* name, const at::Tensor& ref,
                        const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on ", ref_name, "'s device ", ref.device(),
              ", got ", t.device());
}

inline void dtype_is(const char* op, const at::Tensor& t, const char* name, at::ScalarType want) {
  TORCH_CHECK(t.scalar_type() == want, op, ": ", name, " must be ", want, ", got ", t.scalar_type());
}

inline void floating(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be a floating-point tensor, got ",
              t.scalar_type());
}

// `dims` spells the expected shape symbolically, e.g. "(B, S, H, D)"; `want` gives its values.
inline void shape_is(const char* op, const at::Tensor& t, const char* name, std::initializer_list<int64_t> want,
                     const char* dims) {
  TORCH_CHECK(t.sizes().equals(want), op, ": ", name, " must have shape ", dims, " = ", c10::IntArrayRef(want),
              ", got ", t.sizes());
}

// The kernels read rows as dense vectors along the last dim (the other strides are free).
inline void last_dim_contiguous(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.numel() == 0 || t.size(-1) == 1 || t.stride(-1) == 1, op, ": ", name,
              " must have a contiguous last dim (stride(-1) == 1), got strides ", t.strides());
}

// Tensors the kernels index as dense arrays by computed offsets (no strides passed).
inline void contiguous(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous, got strides ", t.strides());
}

// In the CUDA implementations, after the other checks: unreachable through the dispatcher (every tensor is on
// `t`'s device, and the CUDA kernel only runs for CUDA tensors); the last line of defence before a CUDA call.
inline void on_cuda(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", t.device());
}

// The CPU implementations' last word, once every argument has passed: the op exists only on CUDA.
// NotImplementedError in Python (a subclass of RuntimeError).
[[noreturn]] inline void needs_cuda(const char* op, const at::Tensor& first) {
  C10_THROW_ERROR(NotImplementedError,
                  c10::str(op, ": needs CUDA tensors, got ", first.device(),
                           " tensors (the arguments are valid; on CPU use longattn's torch or triton backend)"));
}

}  // namespace longattn::argcheck
