// The CPU implementations behind bspf/cpu.h. dispatch.cpp picks one per call.
#pragma once

#include "bspf/params.h"

namespace bspf::cpu::scalar {
void mask(const ForwardParams& params);
void forward(const ForwardParams& params);
void backward(const BackwardParams& params);
}  // namespace bspf::cpu::scalar
