// The `mmer_ext._C` Python module. It holds build facts only: the ops are registered with the dispatcher by the
// TORCH_LIBRARY blocks in csrc/ops/*, which run when this shared library is loaded.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace py = pybind11;

namespace {

std::vector<std::string> split_csv(const std::string& s) {
  std::vector<std::string> out;
  std::string cur;
  for (char c : s) {
    if (c == ',') {
      if (!cur.empty()) out.push_back(cur);
      cur.clear();
    } else {
      cur.push_back(c);
    }
  }
  if (!cur.empty()) out.push_back(cur);
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "mmer_ext compiled library: registers torch.ops.mmer_ext.* and reports how it was built";
  m.attr("__version__") = MMER_EXT_VERSION;
  m.attr("torch_version") = MMER_EXT_TORCH_VERSION;
  m.attr("torch_cuda_version") = std::string(MMER_EXT_TORCH_CUDA_VERSION).empty()
                                     ? py::object(py::none())
                                     : py::object(py::str(MMER_EXT_TORCH_CUDA_VERSION));
  m.attr("with_cuda") = static_cast<bool>(MMER_EXT_WITH_CUDA_FLAG);
  m.attr("nvcc_version") = std::string(MMER_EXT_NVCC_VERSION).empty()
                               ? py::object(py::none())
                               : py::object(py::str(MMER_EXT_NVCC_VERSION));
  m.attr("cuda_arch_list") = split_csv(MMER_EXT_CUDA_ARCH_LIST);
  m.attr("cxx_standard") = MMER_EXT_CXX_STANDARD;
  m.def(
      "openmp_max_threads",
      []() {
#if defined(_OPENMP)
        return omp_get_max_threads();
#else
        return 1;
#endif
      },
      "Threads the OpenMP runtime of this library would use (0 or 1 when built without OpenMP).");
  m.attr("with_openmp") =
#if defined(_OPENMP)
      true;
#else
      false;
#endif
}
