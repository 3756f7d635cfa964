// resnet_fast._C: the Python module that carries the CUDA kernels.
//
// Loading the shared object runs the static TORCH_LIBRARY_IMPL registrations of every
// csrc/*.cu file, which add CUDA kernels to the resnet_fast operators whose schemas
// resnet_fast/ops defines in Python. The module itself has one function, build_info(),
// saying how it was built; setup.py passes the facts in as RESNET_FAST_* defines (this
// file only: pybind11 alone, no torch/extension.h, keeps it quick to compile).

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#if !defined(RESNET_FAST_ARCHITECTURES) || !defined(RESNET_FAST_CUDA_VERSION) || \
    !defined(RESNET_FAST_TORCH_VERSION) || !defined(RESNET_FAST_SOURCE_FINGERPRINT) ||  \
    !defined(RESNET_FAST_BUILD_FLAGS)
#error "setup.py defines RESNET_FAST_ARCHITECTURES ... RESNET_FAST_BUILD_FLAGS; build the extension through it"
#endif

namespace {

pybind11::dict build_info() {
  const std::vector<std::string> architectures = RESNET_FAST_ARCHITECTURES;
  const std::vector<std::string> build_flags = RESNET_FAST_BUILD_FLAGS;
  pybind11::dict info;
  info["architectures"] = architectures;
  info["cuda_version"] = std::string(RESNET_FAST_CUDA_VERSION);
  info["torch_version"] = std::string(RESNET_FAST_TORCH_VERSION);
  info["source_fingerprint"] = std::string(RESNET_FAST_SOURCE_FINGERPRINT);
  info["build_flags"] = build_flags;
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "CUDA kernels for the resnet_fast operators; importing registers them.";
  m.def("build_info", &build_info,
        "How this extension was built: a new dict with 'architectures' (list of 'X.Y' compute capabilities "
        "with GPU code), 'cuda_version' (nvcc's 'major.minor'), 'torch_version' (the torch compiled against), "
        "'source_fingerprint' (sha256 hex of csrc/, resnet_fast._build.source_fingerprint) and 'build_flags' "
        "(nvcc's flags).");
}
