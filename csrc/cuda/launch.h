// Per-dtype launchers, defined in launch.cuh and instantiated once per dtype in
// instantiate_<dtype>.cu (so the four instantiations compile in parallel).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "bspf/cuda.h"
#include "bspf/params.h"

namespace bspf::cuda {

// Throws std::runtime_error naming `what` when err is not cudaSuccess.
void check(cudaError_t err, const char* what);

template <typename T> void launch_mask(const ForwardParams& params, cudaStream_t stream);
template <typename T> void launch_forward(const ForwardParams& params, cudaStream_t stream);
template <typename T>
void launch_backward(const BackwardParams& params, const BackwardWorkspace& workspace, cudaStream_t stream);

}  // namespace bspf::cuda
