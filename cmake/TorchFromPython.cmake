# Describe the torch installed in the build's Python as an imported target, `mmer_ext::torch`.
#
# Why not find_package(Torch): Caffe2Config.cmake of a CUDA-enabled torch insists on a complete CUDA toolkit
# (nvcc, cudart, nvrtc, ...) even when only CPU code is compiled, so a CPU-only build against the CUDA wheel would
# fail, and the CUDA build would need nvrtc although no kernel of ours uses it. Asking the interpreter for the same
# facts (include dirs, libraries, C++ ABI, CUDA version) is what torch.utils.cpp_extension does too.
#
# Sets: TORCH_VERSION, TORCH_VERSION_MAJOR_MINOR, TORCH_CUDA_VERSION ("" for a CPU torch), TORCH_LIB_DIR,
#       TORCH_SITE_PACKAGES, TORCH_CXX11_ABI.

execute_process(
  COMMAND "${Python_EXECUTABLE}" -c [=[
import os, torch
from torch.utils import cpp_extension as ce
print(torch.__version__)
print(torch.version.cuda or "")
print("|".join(ce.include_paths()))
print(os.path.join(os.path.dirname(torch.__file__), "lib"))
print(int(torch._C._GLIBCXX_USE_CXX11_ABI))
print(os.path.dirname(os.path.dirname(torch.__file__)))
]=]
  OUTPUT_VARIABLE _torch_info
  ERROR_VARIABLE _torch_err
  RESULT_VARIABLE _torch_rc
  OUTPUT_STRIP_TRAILING_WHITESPACE)
if(NOT _torch_rc EQUAL 0)
  message(FATAL_ERROR
    "mmer_ext: could not import torch with ${Python_EXECUTABLE}:\n${_torch_err}\n"
    "Install torch first, then build with `pip install --no-build-isolation .` so the build sees it.")
endif()
string(REPLACE "\n" ";" _torch_info "${_torch_info}")
list(GET _torch_info 0 TORCH_VERSION)
list(GET _torch_info 1 TORCH_CUDA_VERSION)
list(GET _torch_info 2 _torch_includes)
list(GET _torch_info 3 TORCH_LIB_DIR)
list(GET _torch_info 4 TORCH_CXX11_ABI)
list(GET _torch_info 5 TORCH_SITE_PACKAGES)
string(REPLACE "|" ";" TORCH_INCLUDE_DIRS "${_torch_includes}")
string(REGEX MATCH "^[0-9]+\\.[0-9]+" TORCH_VERSION_MAJOR_MINOR "${TORCH_VERSION}")
message(STATUS "mmer_ext: torch ${TORCH_VERSION} (CUDA: ${TORCH_CUDA_VERSION}) at ${TORCH_LIB_DIR}")

function(_mmer_torch_lib out name)
  find_library(_lib_${name} NAMES ${name} PATHS "${TORCH_LIB_DIR}" NO_DEFAULT_PATH NO_CACHE REQUIRED)
  set(${out} "${_lib_${name}}" PARENT_SCOPE)
endfunction()

_mmer_torch_lib(_c10 c10)
_mmer_torch_lib(_torch torch)
_mmer_torch_lib(_torch_cpu torch_cpu)

add_library(mmer_ext_torch INTERFACE)
add_library(mmer_ext::torch ALIAS mmer_ext_torch)
target_include_directories(mmer_ext_torch SYSTEM INTERFACE ${TORCH_INCLUDE_DIRS})
target_compile_definitions(mmer_ext_torch INTERFACE _GLIBCXX_USE_CXX11_ABI=${TORCH_CXX11_ABI})
target_link_libraries(mmer_ext_torch INTERFACE "${_c10}" "${_torch}" "${_torch_cpu}")

# The CUDA half of torch, linked only when our CUDA kernels are built.
function(mmer_ext_torch_cuda_libraries out)
  _mmer_torch_lib(_c10_cuda c10_cuda)
  _mmer_torch_lib(_torch_cuda torch_cuda)
  set(${out} "${_c10_cuda}" "${_torch_cuda}" PARENT_SCOPE)
endfunction()
