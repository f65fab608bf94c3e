// The backward (SPEC §4) in two deterministic kernels and a cast, no atomics:
//   row_stats_kernel (backward_row_stats.cuh): per row strip, δ, s and dρ in one sweep;
//   gradients_kernel (backward_gradients.cuh): per column strip, dX and dV of its rows;
//   cast_kernel: the accumulation-type gradients to the input dtype, unless they alias.
// P, R and dA are recomputed from X, V, dOut and the saved lse, Z, mask and matches rather
// than stored. Shared memory is fixed per dtype (backward_plan.cuh): no N or D limit.
#pragma once

#include "backward_gradients.cuh"
#include "backward_plan.cuh"
#include "backward_row_stats.cuh"
#include "common.cuh"
#include "launch.cuh"

namespace bspf::cuda {

// grad (input dtype) = the accumulator (accumulation type), when they are not the same buffer.
template <typename T>
__global__ void __launch_bounds__(256) cast_kernel(const acc_t<T>* src, T* dst, int64_t count) {
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < count; e += int64_t{gridDim.x} * blockDim.x)
    dst[e] = from_acc<T>(src[e]);
}

template <typename T>
size_t backward_shared_bytes(const Problem&, size_t) {
  return BackwardPlan<T>::bytes;
}

template <typename T>
void launch_backward(const BackwardParams& params, const BackwardWorkspace& workspace, size_t, cudaStream_t stream) {
  using A = acc_t<T>;
  const Chunks ch(params.p.seqlen, params.p.block_size);
  using Plan = BackwardPlan<T>;
  const dim3 grid = grid_for(GradStrips(ch).count, params.p.pairs());
  launch_kernel(row_stats_kernel<T>, grid, kThreads, Plan::r_bytes, stream,
                "launching the backward row-statistics kernel", params, workspace.row_stats);
  launch_kernel(gradients_kernel<T>, grid, kThreads, Plan::g_bytes, stream, "launching the backward gradients kernel",
                params, static_cast<const void*>(workspace.row_stats), workspace.grad_qk_acc,
                workspace.grad_v_acc);
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
    launch_kernel(cast_kernel<T>, dim3(static_cast<unsigned>(blocks)), 256, 0, stream,
                  "launching the gradient cast kernel", static_cast<const A*>(c.acc), static_cast<T*>(c.out),
                  c.count);
  }
}

}  // namespace bspf::cuda
