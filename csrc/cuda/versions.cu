// The CUDA versions the driver check in bspf_ext.ops.backends compares. Kept to these two
// runtime calls: neither needs a GPU or creates a context, and with no driver installed
// cudaDriverGetVersion succeeds and reports 0.
#include <cuda_runtime.h>

#include "bspf/cuda.h"

namespace bspf::cuda {

int32_t driver_version() {
  int version = 0;
  if (cudaDriverGetVersion(&version) != cudaSuccess) return 0;
  return version;
}

int32_t runtime_version() {
  int version = 0;
  // The runtime is linked statically, so this is the toolkit the module was built with.
  if (cudaRuntimeGetVersion(&version) != cudaSuccess) return CUDART_VERSION;
  return version;
}

}  // namespace bspf::cuda
