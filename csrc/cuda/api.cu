// The CUDA entry points: argument checks, the device, each op's size limit, dtype dispatch.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "bspf/cuda.h"
#include "bspf/validate.h"
#include "launch.h"

namespace bspf::cuda {

void check(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return;
  throw std::runtime_error(std::string("bspf_ext CUDA error while ") + what + ": " + cudaGetErrorName(err) + " (" +
                           cudaGetErrorString(err) + ")");
}

namespace {

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return "float32";
    case DType::kFloat64: return "float64";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
  }
  return "unknown";
}

template <typename Fn>
void by_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: return fn(float{});
    case DType::kFloat64: return fn(double{});
    case DType::kFloat16: return fn(__half{});
    case DType::kBFloat16: return fn(__nv_bfloat16{});
  }
}

// The shared-memory limit `max_seqlen` and `shared_bytes` assume without a device: an
// H100's opt-in limit per block.
constexpr size_t kReferenceSmemLimit = 227 * 1024;

enum class Op { kForward, kBackward };

const char* op_name(Op op) { return op == Op::kForward ? "forward" : "backward"; }

size_t op_shared_bytes(Op op, const Problem& p, size_t limit) {
  size_t bytes = 0;
  by_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    bytes = op == Op::kForward ? forward_shared_bytes<T>(p, limit) : backward_shared_bytes<T>(p, limit);
  });
  return bytes;
}

Problem sized(DType dtype, int32_t block_size, int64_t seqlen) {
  Problem p;
  p.dtype = dtype;
  p.batch = p.heads = 1;
  p.seqlen = seqlen;
  p.head_dim = p.value_dim = 64;
  p.block_size = block_size;
  return p;
}

// The largest seqlen op runs for this dtype and block size under `limit` (the need grows
// with N), for head dims of 64 (the kernels' staged tiles grow with D too: the error at
// launch uses the problem's own sizes).
int64_t op_max_seqlen(Op op, const Problem& like, size_t limit) {
  int64_t lo = 0, hi = int64_t{1} << 24;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    Problem p = like;
    p.seqlen = mid;
    if (op_shared_bytes(op, p, limit) <= limit)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

size_t device_smem_limit(int32_t device) {
  int optin = 0;
  check(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
        "querying the device's shared memory");
  return static_cast<size_t>(optin);
}

// Makes `device` current for this thread's runtime and checks that op fits the problem;
// returns the device's shared-memory limit, which the launchers plan with.
size_t prepare(Op op, const Problem& p, int32_t device) {
  check(cudaSetDevice(device), "selecting the CUDA device (is an NVIDIA GPU with a working driver present?)");
  const size_t limit = device_smem_limit(device);
  if (op_shared_bytes(op, p, limit) > limit)
    throw std::invalid_argument("seqlen N = " + std::to_string(p.seqlen) + " is too long for the bspf CUDA " +
                                op_name(op) + " (" + dtype_name(p.dtype) + ", block_size " +
                                std::to_string(p.block_size) + ", head dims " + std::to_string(p.head_dim) + "/" +
                                std::to_string(p.value_dim) + "): the largest N it supports on this device is " +
                                std::to_string(op_max_seqlen(op, p, limit)));
  return limit;
}

void require(const void* pointer, const char* name) {
  if (pointer == nullptr) throw std::invalid_argument(std::string("bspf CUDA kernels: ") + name + " is null");
}

}  // namespace

int64_t shared_bytes(DType dtype, int32_t block_size, int64_t seqlen) {
  const Problem p = sized(dtype, block_size, seqlen);
  validate(p);
  return static_cast<int64_t>(std::max(op_shared_bytes(Op::kForward, p, kReferenceSmemLimit),
                                       op_shared_bytes(Op::kBackward, p, kReferenceSmemLimit)));
}

int64_t max_seqlen(DType dtype, int32_t block_size, int32_t device) {
  const Problem p = sized(dtype, block_size, 0);
  validate(p);
  const size_t limit = device_smem_limit(device);
  return std::min(op_max_seqlen(Op::kForward, p, limit), op_max_seqlen(Op::kBackward, p, limit));
}

void mask(const ForwardParams& params, int32_t device, std::uintptr_t stream) {
  validate(params, Entry::kMask);
  if (is_empty(params.p)) return;
  const size_t limit = prepare(Op::kForward, params.p, device);
  by_dtype(params.p.dtype, [&](auto tag) {
    launch_mask<decltype(tag)>(params, limit, reinterpret_cast<cudaStream_t>(stream));
  });
}

void forward(const ForwardParams& params, int32_t device, std::uintptr_t stream) {
  validate(params, Entry::kForward);
  if (is_empty(params.p)) return;
  const size_t limit = prepare(Op::kForward, params.p, device);
  by_dtype(params.p.dtype, [&](auto tag) {
    launch_forward<decltype(tag)>(params, limit, reinterpret_cast<cudaStream_t>(stream));
  });
}

void backward(const BackwardParams& params, const BackwardWorkspace& workspace, int32_t device,
              std::uintptr_t stream) {
  validate(params);
  if (is_empty(params.p)) return;
  // The workspace is this backend's own (bspf/cuda.h).
  require(workspace.row_stats, "workspace.row_stats");
  require(workspace.grad_qk_acc, "workspace.grad_qk_acc");
  if (params.p.value_dim > 0) require(workspace.grad_v_acc, "workspace.grad_v_acc");
  const size_t limit = prepare(Op::kBackward, params.p, device);
  by_dtype(params.p.dtype, [&](auto tag) {
    launch_backward<decltype(tag)>(params, workspace, limit, reinterpret_cast<cudaStream_t>(stream));
  });
}

}  // namespace bspf::cuda
