// The CUDA kernels for float16 inputs.
#include "instantiate.cuh"

namespace bspf::cuda {
BSPF_INSTANTIATE_LAUNCHERS(__half)
}  // namespace bspf::cuda
