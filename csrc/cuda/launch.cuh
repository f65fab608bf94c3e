// Launch helpers shared by the per-op launchers (forward.cuh, backward.cuh): every
// kernel goes through launch_kernel, which uses the runtime's typed cudaLaunchKernelEx
// (the same call runs the kernels on the CPU under tools/cuda_emulation), on the
// caller's stream, and checks the launch.
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>

#include "common.cuh"
#include "launch.h"

namespace bspf::cuda {

constexpr int64_t kMaxGridY = 65535;

// Raises the kernel's dynamic shared memory limit when it needs more than the default.
template <typename... P>
void allow_shared(void (*kernel)(P...), size_t bytes) {
  if (bytes > 48 * 1024)
    check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)),
          "raising the shared memory limit");
}

// One CTA per (x, (b, h)); pairs beyond the grid's y limit are looped over in the kernels.
inline dim3 grid_for(int64_t blocks_per_pair, int64_t pairs) {
  return dim3(static_cast<unsigned>(blocks_per_pair), static_cast<unsigned>(std::min(pairs, kMaxGridY)));
}

template <typename... P, typename... Args>
void launch_kernel(void (*kernel)(P...), dim3 grid, unsigned threads, size_t shared_bytes, cudaStream_t stream,
                   const char* what, Args&&... args) {
  allow_shared(kernel, shared_bytes);
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = dim3(threads);
  config.dynamicSmemBytes = shared_bytes;
  config.stream = stream;
  check(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...), what);
}

}  // namespace bspf::cuda
