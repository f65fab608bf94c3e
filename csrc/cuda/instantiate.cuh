// Explicit instantiation of every launcher for one dtype (see launch.h).
#pragma once

#include "backward.cuh"
#include "forward.cuh"

#define BSPF_INSTANTIATE_LAUNCHERS(T)                                                                     \
  template size_t forward_shared_bytes<T>(const Problem&, size_t);                                        \
  template size_t backward_shared_bytes<T>(const Problem&, size_t);                                       \
  template void launch_mask<T>(const ForwardParams&, size_t, cudaStream_t);                               \
  template void launch_forward<T>(const ForwardParams&, size_t, cudaStream_t);                            \
  template void launch_backward<T>(const BackwardParams&, const BackwardWorkspace&, size_t, cudaStream_t);
