// The one Python module, mtlfast._C. The ops themselves register with the torch dispatcher
// (TORCH_LIBRARY_FRAGMENT in each source), so loading this module is what makes
// torch.ops.mtlfast.* exist; here only facts about the build.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mtlfast compiled kernels (ops are registered under torch.ops.mtlfast)";
  m.def("has_cuda_kernels", []() {
#ifdef MTLFAST_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
  m.def("compiler", []() {
#if defined(__clang__)
    return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
    return std::string("gcc ") + __VERSION__;
#else
    return std::string("unknown");
#endif
  });
}
