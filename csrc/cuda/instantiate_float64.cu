// The CUDA kernels for float64 inputs.
#include "instantiate.cuh"

namespace bspf::cuda {
BSPF_INSTANTIATE_LAUNCHERS(double)
}  // namespace bspf::cuda
