// resnet_fast._C: the Python module that carries the CUDA kernels.
//
// The module itself is empty. Loading the shared object runs the static
// TORCH_LIBRARY_IMPL registrations of every csrc/*.cu file, which add CUDA kernels to
// the resnet_fast operators whose schemas resnet_fast/ops defines in Python. Plain
// Python C API (no pybind11, no torch/extension.h) keeps this file quick to compile.

#include <Python.h>

static struct PyModuleDef resnet_fast_c_module = {
    PyModuleDef_HEAD_INIT,
    "resnet_fast._C",  // m_name
    "CUDA kernels for the resnet_fast operators; importing registers them.",  // m_doc
    0,        // m_size: no per-module state
    nullptr,  // m_methods
    nullptr,  // m_slots
    nullptr,  // m_traverse
    nullptr,  // m_clear
    nullptr,  // m_free
};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&resnet_fast_c_module); }
