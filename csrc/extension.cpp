// longattn._C: the CUDA backend's native library.
//
// The ops themselves are registered with the dispatcher (TORCH_LIBRARY schemas here, CUDA
// implementations under TORCH_LIBRARY_IMPL(longattn, CUDA, ...) beside their kernels); Python reaches
// them as torch.ops.longattn.*. This file also makes the shared object importable as a Python module
// (`import longattn._C` loads the library and runs the registrations) and records how it was built.
#include <Python.h>
#include <torch/library.h>

#ifndef LONGATTN_CUDA_ARCHS
#define LONGATTN_CUDA_ARCHS "unknown"
#endif

// Schemas of the raw CUDA ops. A fragment, because the Python-side custom ops (longattn/_ops.py)
// live in the same namespace.
TORCH_LIBRARY_FRAGMENT(longattn, m) {
  (void)m;  // kernel schemas are added with the kernels (csrc/*.cu)
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
