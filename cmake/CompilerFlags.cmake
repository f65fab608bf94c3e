# Compiler flags for the kernels. Never -march=native: a wheel must run on any x86-64,
# so SIMD code lives in its own translation units with their own flags and is chosen
# at run time.

function(bspf_portable_flags target)
  if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    target_compile_options(${target} PRIVATE -O3 -Wall -Wextra -fno-math-errno)
  endif()
endfunction()
