// The CUDA kernels for float32 inputs.
#include "instantiate.cuh"

namespace bspf::cuda {
BSPF_INSTANTIATE_LAUNCHERS(float)
}  // namespace bspf::cuda
