// The CUDA kernels for float64 inputs.
#include "launch.cuh"

namespace bspf::cuda {
BSPF_INSTANTIATE_LAUNCHERS(double)
}  // namespace bspf::cuda
