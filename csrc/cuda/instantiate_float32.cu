// The CUDA kernels for float32 inputs.
#include "launch.cuh"

namespace bspf::cuda {
BSPF_INSTANTIATE_LAUNCHERS(float)
}  // namespace bspf::cuda
