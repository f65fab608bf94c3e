// Per-dtype launchers, defined beside their kernels (forward.cuh, backward.cuh) and
// instantiated once per dtype in instantiate_<dtype>.cu (so the four instantiations
// compile in parallel). Each op sizes its shared memory for its own need:
// *_shared_bytes gives the bytes the op launches with under `smem_limit` (the device's
// opt-in limit per block), or more than the limit when no layout of the op fits.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "bspf/cuda.h"
#include "bspf/params.h"

namespace bspf::cuda {

// Throws std::runtime_error naming `what` when err is not cudaSuccess.
void check(cudaError_t err, const char* what);

template <typename T> size_t forward_shared_bytes(const Problem& p, size_t smem_limit);
template <typename T> size_t backward_shared_bytes(const Problem& p, size_t smem_limit);

template <typename T> void launch_mask(const ForwardParams& params, size_t smem_limit, cudaStream_t stream);
template <typename T> void launch_forward(const ForwardParams& params, size_t smem_limit, cudaStream_t stream);
template <typename T>
void launch_backward(const BackwardParams& params, const BackwardWorkspace& workspace, size_t smem_limit,
                     cudaStream_t stream);

}  // namespace bspf::cuda
