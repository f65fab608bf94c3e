# Compiler flags for the kernels. Never -march=native: a wheel must run on any x86-64,
# so SIMD code lives in its own translation units with their own flags and is chosen
# at run time.

function(bspf_portable_flags target)
  if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    target_compile_options(${target} PRIVATE -O3 -Wall -Wextra -fno-math-errno)
  endif()
endfunction()

# BSPF_SANITIZE=ON: the CPU kernels and their module built with AddressSanitizer and
# UndefinedBehaviorSanitizer, any finding fatal (tools/sanitize_cpu.sh runs the CPU op
# tests on such a build in CI). Never for a wheel that ships.
option(BSPF_SANITIZE "Build the CPU kernels with ASan and UBSan (testing only)" OFF)

function(bspf_sanitizer_flags target)
  if(BSPF_SANITIZE AND CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    set(flags -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer -g)
    target_compile_options(${target} PRIVATE ${flags})
    target_link_options(${target} PRIVATE ${flags})
  endif()
endfunction()
