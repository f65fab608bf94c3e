// Launch templates: grid shape, shared memory opt-in and error checks. Every kernel
// runs on the caller's stream with one CTA per (chunk or block, (b, h)); (b, h) pairs
// beyond the grid's y limit are looped over inside the kernels.
#pragma once

#include <algorithm>
#include <cstdint>

#include "backward.cuh"
#include "forward.cuh"
#include "launch.h"
#include "mask.cuh"

namespace bspf::cuda {

constexpr int64_t kMaxGridY = 65535;

// Raises the kernel's dynamic shared memory limit when it needs more than the default.
template <typename Kernel>
void allow_shared(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024)
    check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)),
          "raising the shared memory limit");
}

inline dim3 grid_for(int64_t blocks_per_pair, int64_t pairs) {
  return dim3(static_cast<unsigned>(blocks_per_pair), static_cast<unsigned>(std::min(pairs, kMaxGridY)));
}

template <typename T>
void launch_mask(const ForwardParams& params, cudaStream_t stream) {
  using A = acc_t<T>;
  const Chunks ch(params.p.seqlen, params.p.block_size);
  const int64_t C = ch.count;
  const int64_t keep_full = keep_count(params.keep_ratio, ch.omega, ch.omega);
  const int64_t keep_last = keep_count(params.keep_ratio, ch.omega, ch.size(C - 1));
  const size_t bytes = MaskLayout::make<A>(ch.omega).bytes;
  allow_shared(mask_kernel<T>, bytes);
  mask_kernel<T><<<grid_for(C * C, params.p.pairs()), kThreads, bytes, stream>>>(params, keep_full, keep_last);
  check(cudaGetLastError(), "launching the mask kernel");
}

template <typename T>
void launch_forward(const ForwardParams& params, cudaStream_t stream) {
  using A = acc_t<T>;
  launch_mask<T>(params, stream);
  const Chunks ch(params.p.seqlen, params.p.block_size);
  const size_t bytes = ForwardLayout::make<A>(ch.omega, ch.count).bytes;
  allow_shared(forward_kernel<T>, bytes);
  forward_kernel<T><<<grid_for(ch.count, params.p.pairs()), kThreads, bytes, stream>>>(params);
  check(cudaGetLastError(), "launching the forward kernel");
}

template <typename T>
void launch_backward(const BackwardParams& params, const BackwardWorkspace& workspace, cudaStream_t stream) {
  using A = acc_t<T>;
  const Chunks ch(params.p.seqlen, params.p.block_size);
  const dim3 grid = grid_for(ch.count, params.p.pairs());

  const size_t stats_bytes = RowStatsLayout::make<A>(ch.omega, ch.count).bytes;
  allow_shared(row_stats_kernel<T>, stats_bytes);
  row_stats_kernel<T><<<grid, kThreads, stats_bytes, stream>>>(params, workspace.row_stats);
  check(cudaGetLastError(), "launching the backward row-statistics kernel");

  const size_t grad_bytes = GradientsLayout::make<A>(ch.omega, ch.count).bytes;
  allow_shared(gradients_kernel<T>, grad_bytes);
  gradients_kernel<T><<<grid, kThreads, grad_bytes, stream>>>(params, workspace.row_stats, workspace.grad_qk_acc,
                                                               workspace.grad_v_acc);
  check(cudaGetLastError(), "launching the backward gradients kernel");

  const int64_t rows = params.p.pairs() * params.p.seqlen;
  const struct {
    const void* acc;
    void* out;
    int64_t count;
  } casts[2] = {{workspace.grad_qk_acc, params.grad_qk, rows * params.p.head_dim},
                {workspace.grad_v_acc, params.grad_v, rows * params.p.value_dim}};
  for (const auto& c : casts) {
    if (c.acc == c.out || c.count == 0) continue;
    const int64_t blocks = std::min<int64_t>((c.count + 255) / 256, 65535);
    cast_kernel<T><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(static_cast<const A*>(c.acc),
                                                                        static_cast<T*>(c.out), c.count);
    check(cudaGetLastError(), "launching the gradient cast kernel");
  }
}

// Explicit instantiation of every launcher for one dtype.
#define BSPF_INSTANTIATE_LAUNCHERS(T)                                                     \
  template void launch_mask<T>(const ForwardParams&, cudaStream_t);                       \
  template void launch_forward<T>(const ForwardParams&, cudaStream_t);                    \
  template void launch_backward<T>(const BackwardParams&, const BackwardWorkspace&, cudaStream_t);

}  // namespace bspf::cuda
