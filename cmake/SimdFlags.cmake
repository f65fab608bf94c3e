# The AVX2+FMA translation units (csrc/cpu/avx2/, one per stage): compiled with -mavx2
# -mfma and nothing wider, so the rest of the library stays baseline x86-64 and the path is
# chosen at run time (csrc/cpu/dispatch.cpp). Beside them the AVX-512 products
# (csrc/cpu/avx512/), compiled with -mavx512f and chosen at run time the same way. Other
# architectures build the portable path only.

set(BSPF_AVX2_SOURCES
  csrc/cpu/avx2/forward.cpp
  csrc/cpu/avx2/backward.cpp
  csrc/cpu/avx2/gemm.cpp
  csrc/cpu/avx2/selection.cpp
  csrc/cpu/avx2/matching.cpp
  csrc/cpu/avx2/softmax_fusion.cpp
)
set(BSPF_AVX512_SOURCES
  csrc/cpu/avx512/products.cpp
)

function(bspf_add_avx2_sources target)
  list(TRANSFORM BSPF_AVX2_SOURCES PREPEND ${CMAKE_CURRENT_SOURCE_DIR}/ OUTPUT_VARIABLE sources)
  if(CMAKE_SYSTEM_PROCESSOR MATCHES "^(x86_64|AMD64|amd64|x64)$"
     AND CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    target_sources(${target} PRIVATE ${sources})
    set_source_files_properties(${sources} PROPERTIES COMPILE_OPTIONS "-mavx2;-mfma")
    # Tells the dispatcher (compiled without AVX2 flags) that the path exists.
    target_compile_definitions(${target} PRIVATE BSPF_HAVE_AVX2=1)
    message(STATUS "bspf: AVX2+FMA CPU path enabled (chosen at run time)")
    list(TRANSFORM BSPF_AVX512_SOURCES PREPEND ${CMAKE_CURRENT_SOURCE_DIR}/ OUTPUT_VARIABLE avx512_sources)
    target_sources(${target} PRIVATE ${avx512_sources})
    set_source_files_properties(${avx512_sources} PROPERTIES COMPILE_OPTIONS "-mavx512f;-mavx2;-mfma")
    target_compile_definitions(${target} PRIVATE BSPF_HAVE_AVX512=1)
    message(STATUS "bspf: AVX-512 products enabled (chosen at run time)")
  else()
    message(STATUS "bspf: no AVX2 CPU path for ${CMAKE_SYSTEM_PROCESSOR}; portable path only")
  endif()
endfunction()
