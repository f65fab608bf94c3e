# CUDA architecture selection, included before enable_language(CUDA).
#
# Default: SASS for sm_80 (A100) and sm_90 (H100), plus PTX of sm_90 so newer GPUs can
# JIT it. Override with the cache variable BSPF_CUDA_ARCHITECTURES (CMake's syntax:
# "86-real;89", "native", "all-major", ...), e.g.
#   pip install . -Ccmake.define.BSPF_CUDA_ARCHITECTURES=native
# or with the environment variable of the same name at configure time. An explicit
# CMAKE_CUDA_ARCHITECTURES wins over both.

set(_bspf_default_archs "80-real;90")
if(DEFINED ENV{BSPF_CUDA_ARCHITECTURES} AND NOT "$ENV{BSPF_CUDA_ARCHITECTURES}" STREQUAL "")
  set(_bspf_default_archs "$ENV{BSPF_CUDA_ARCHITECTURES}")
endif()
set(BSPF_CUDA_ARCHITECTURES "${_bspf_default_archs}" CACHE STRING
    "CUDA architectures for bspf_ext._cuda (CMake CUDA_ARCHITECTURES syntax)")

if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES OR "${CMAKE_CUDA_ARCHITECTURES}" STREQUAL "")
  set(CMAKE_CUDA_ARCHITECTURES "${BSPF_CUDA_ARCHITECTURES}")
endif()

set(CMAKE_CUDA_STANDARD 17)
set(CMAKE_CUDA_STANDARD_REQUIRED ON)
# Static runtime: `import bspf_ext._cuda` then needs no libcudart on the library path,
# and works (kernels raise a clear error) on machines without a GPU or driver.
set(CMAKE_CUDA_RUNTIME_LIBRARY Static)

function(bspf_cuda_flags target)
  # No fast-math: the kernels must agree with the float64 reference to 1e-5 in float32.
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CUDA>:-O3 -lineinfo -Xcompiler=-Wall -Xcompiler=-Wextra>)
endfunction()
