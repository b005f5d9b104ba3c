// longattn._C: the CUDA backend's native library.
//
// The ops themselves are registered with the dispatcher (TORCH_LIBRARY schemas here; CUDA
// implementations under TORCH_LIBRARY_IMPL(longattn, CUDA, ...) beside their kernels, and CPU ones that run
// the same argument checks and then raise "needs CUDA tensors"); Python reaches them as torch.ops.longattn.*.
// This file also makes the shared object importable as a Python module (`import longattn._C` loads the
// library and runs the registrations) and records how it was built.
#include <Python.h>
#include <cuda.h>  // CUDA_VERSION
#include <torch/library.h>

#ifndef LONGATTN_CUDA_ARCHS
#define LONGATTN_CUDA_ARCHS "unknown"
#endif

// Schemas of the raw CUDA ops. A fragment, because the Python-side custom ops (longattn/_ops.py)
// live in the same namespace.
// The raw ops take the backend contract's arguments (longattn/backends/__init__.py) minus `backend`;
// their CUDA and CPU implementations live in band_side_api.cpp and block_aggregate_api.cpp, their fake (meta)
// implementations in longattn/backends/cuda_backend.py. Arguments added later come last with defaults (calls
// without them keep working); cuda_band_side_bwd always returns dhalo_k / dhalo_v, (0,) without halo keys, and
// with side_index (Longformer's band pass: side keys read in place from rows of k / v) dside_k / dside_v empty; for
// Longformer's global rows, side_only (no band keys: dk / dv empty), lse_split (lse shared by lse_split batch rows)
// and dside_k_into / dside_v_into (the side keys' dK/dV added into them; dside_k / dside_v then empty), and
// query_index ((B_q, G) int64, only with side_only: row g of batch row b reads q, dout and out, the unsplit
// (B_q, S, H, D) tensors, at token query_index[b / C, g] of batch row b / C, in place; the op's batch is side_k's
// B = B_q * C, and out / lse / dq keep its (B, G, ...) layout; tokens outside [0, S) read zeros: out 0, lse +inf,
// dq 0).
TORCH_LIBRARY_FRAGMENT(longattn, m) {
  m.def(
      "cuda_band_side_fwd(Tensor q, Tensor k, Tensor v, Tensor side_k, Tensor side_v, Tensor? band_key_mask, "
      "Tensor? side_mask, Tensor? query_block, Tensor? band_bias, Tensor? side_bias, int left, int right, "
      "float scale, float dropout_p=0.0, Tensor? rng=None, bool dropout_global_rows=False, "
      "Tensor? key_ranges=None, Tensor? side_ranges=None, Tensor? halo_k=None, Tensor? halo_v=None, "
      "Tensor? halo_mask=None, int halo_left=0, int dropout_offset=0, Tensor? side_index=None, "
      "Tensor? query_mask=None, bool band_rows_only=False, bool side_only=False, Tensor? query_index=None) -> "
      "(Tensor out, Tensor lse)");
  m.def(
      "cuda_band_side_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor side_k, Tensor side_v, Tensor out, "
      "Tensor lse, Tensor? band_key_mask, Tensor? side_mask, Tensor? query_block, Tensor? band_bias, "
      "Tensor? side_bias, int left, int right, float scale, float dropout_p=0.0, Tensor? rng=None, "
      "bool dropout_global_rows=False, Tensor? key_ranges=None, Tensor? side_ranges=None, Tensor? halo_k=None, "
      "Tensor? halo_v=None, Tensor? halo_mask=None, int halo_left=0, Tensor? dlse=None, int dropout_offset=0, "
      "Tensor? side_index=None, bool side_only=False, int lse_split=1, Tensor(a!)? dside_k_into=None, "
      "Tensor(b!)? dside_v_into=None, Tensor? query_index=None) -> "
      "(Tensor dq, Tensor dk, Tensor dv, Tensor dside_k, Tensor dside_v, Tensor dband_bias, Tensor dside_bias, "
      "Tensor dhalo_k, Tensor dhalo_v)");
  m.def(
      "cuda_block_aggregate_fwd(Tensor x, Tensor block_ids, int num_blocks, Tensor? weight, float eps) "
      "-> (Tensor out, Tensor sums, Tensor rstd)");
  m.def(
      "cuda_block_aggregate_bwd(Tensor dout, Tensor x, Tensor block_ids, int num_blocks, Tensor? weight, "
      "Tensor sums, Tensor rstd, float eps) -> (Tensor dx, Tensor dweight)");
  // Longformer's glue around the band op (longformer_api.cpp): the global tokens' slot layout; for the global rows'
  // key splits (whose band op reads the slots' rows in place through query_index), the splits merged into rows pos of
  // out (returning glse) and their dq rows summed into rows pos of dq (zero_fill: dq, contiguous, zeroed first: a new
  // dq for separate global projections).
  // global_slots' zero: Longformer's fused forward's arrival counters (contiguous int32), zeroed by the same launch.
  m.def(
      "cuda_longformer_global_slots(Tensor global_mask, Tensor? key_padding_mask, int G, Tensor(a!)? zero=None) "
      "-> (Tensor band_rows, Tensor pos, Tensor used)");
  m.def(
      "cuda_longformer_rows_merge(Tensor out_parts, Tensor lse_parts, Tensor pos, Tensor used, Tensor(a!) out) "
      "-> Tensor glse");
  // Longformer's fused forward (longformer_fused_api.cpp): the band pass and the global rows' key splits, merged, in
  // one launch; counter: B * H * ceil(G / 64) int32 zeros (global_slots' zero), used by the launch.
  m.def(
      "cuda_longformer_fwd(Tensor q, Tensor k, Tensor v, Tensor band_rows, Tensor pos, Tensor used, "
      "Tensor? key_padding_mask, int left, int right, float scale, Tensor q_global, Tensor split_k, Tensor split_v, "
      "Tensor? split_mask, Tensor(a!) counter, Tensor? key_ranges=None, Tensor? side_ranges=None, "
      "Tensor? split_ranges=None) -> (Tensor out, Tensor lse, Tensor glse)");
  // Longformer's fused backward (longformer_fused_bwd_api.cpp): the band pass's and the global rows' backward and the
  // splits' dq sum, in 4 launches (shared_kv: the splits are k / v's, the rows' key gradients added into dk / dv; else
  // returned per split as dsplit_k / dsplit_v; q_global: the rows' dq into a new dq_global, else into dq).
  m.def(
      "cuda_longformer_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor glse, "
      "Tensor band_rows, Tensor pos, Tensor used, int left, int right, float scale, Tensor split_k, Tensor split_v, "
      "Tensor? split_mask, Tensor? key_ranges=None, Tensor? side_ranges=None, Tensor? split_ranges=None, "
      "Tensor? q_global=None, bool shared_kv=True) "
      "-> (Tensor dq, Tensor dk, Tensor dv, Tensor dq_global, Tensor dsplit_k, Tensor dsplit_v)");
  m.def("cuda_longformer_rows_add(Tensor dq_parts, Tensor pos, Tensor used, Tensor(a!) dq, bool zero_fill=False) "
        "-> ()");
}

static struct PyModuleDef longattn_c_module = {
    PyModuleDef_HEAD_INIT, "_C",
    "longattn CUDA kernels; ops are registered as torch.ops.longattn.*", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&longattn_c_module);
  if (module == nullptr) return nullptr;
  if (PyModule_AddStringConstant(module, "cuda_archs", LONGATTN_CUDA_ARCHS) < 0) return nullptr;
#ifdef CUDA_VERSION
  PyModule_AddIntConstant(module, "cuda_version", CUDA_VERSION);
#endif
  return module;
}
