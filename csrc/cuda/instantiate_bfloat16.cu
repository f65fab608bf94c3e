// The CUDA kernels for bfloat16 inputs.
#include "instantiate.cuh"

namespace bspf::cuda {
BSPF_INSTANTIATE_LAUNCHERS(__nv_bfloat16)
}  // namespace bspf::cuda
