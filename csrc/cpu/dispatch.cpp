// Chooses the CPU implementation per call. BSPF_CPU_CAPABILITY=scalar|avx2 forces one
// (tests use it to compare the paths); otherwise the best one this CPU supports.
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "bspf/cpu.h"
#include "kernels.h"

namespace bspf::cpu {

const char* capability() {
  const char* forced = std::getenv("BSPF_CPU_CAPABILITY");
  if (forced && *forced) {
    if (std::strcmp(forced, "scalar") == 0) return "scalar";
    throw std::invalid_argument(std::string("BSPF_CPU_CAPABILITY must be 'scalar' or 'avx2', got '") + forced +
                                "' (this build has the scalar path only)");
  }
  return "scalar";
}

void mask(const ForwardParams& params) {
  capability();
  scalar::mask(params);
}

void forward(const ForwardParams& params) {
  capability();
  scalar::forward(params);
}

void backward(const BackwardParams& params) {
  capability();
  scalar::backward(params);
}

}  // namespace bspf::cpu
