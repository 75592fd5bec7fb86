// The Python module `fastlm._C`.
//
// Importing it runs the static TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL
// registrations of every csrc/cpu/<op>.cpp and csrc/cuda/<op>_ops.cpp file, which
// put the kernels under `torch.ops.fastlm_C.<op>_forward` / `<op>_backward`.
// Each op's schema is defined once, next to its CPU kernel; the CUDA glue only
// adds a CUDA implementation of the same schema.
#include <Python.h>
#include <torch/library.h>

// The namespace every C++ kernel registers into (fragments add the schemas).
TORCH_LIBRARY(fastlm_C, m) {}

static struct PyModuleDef fastlm_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&fastlm_c_module);
  if (module == nullptr) return nullptr;
#ifdef FASTLM_WITH_CUDA
  PyModule_AddIntConstant(module, "WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(module, "WITH_CUDA", 0);
#endif
  return module;
}
