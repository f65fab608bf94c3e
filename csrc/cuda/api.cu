// The CUDA entry points: argument checks, the device, the size limit, dtype dispatch.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "backward.cuh"
#include "bspf/cuda.h"
#include "forward.cuh"
#include "launch.h"
#include "mask.cuh"

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

template <typename A>
size_t shared_bytes_for(int32_t omega, int64_t chunks) {
  const int32_t c = static_cast<int32_t>(std::min<int64_t>(chunks, INT32_MAX));
  return std::max({MaskLayout::make<A>(omega).bytes, ForwardLayout::make<A>(omega, c).bytes,
                   RowStatsLayout::make<A>(omega, c).bytes, GradientsLayout::make<A>(omega, c).bytes});
}

size_t shared_bytes_chunks(DType dtype, int32_t block_size, int64_t chunks) {
  return dtype == DType::kFloat64 ? shared_bytes_for<double>(block_size, chunks)
                                  : shared_bytes_for<float>(block_size, chunks);
}

void check_problem(const Problem& p) {
  if (p.dtype != DType::kFloat32 && p.dtype != DType::kFloat64 && p.dtype != DType::kFloat16 &&
      p.dtype != DType::kBFloat16)
    throw std::invalid_argument("bspf CUDA kernels support float32, float64, float16 and bfloat16 only");
  if (p.block_size < 1 || p.block_size > 64)
    throw std::invalid_argument("block_size must be in [1, 64], got " + std::to_string(p.block_size));
  if (p.batch < 0 || p.heads < 0 || p.seqlen < 0 || p.head_dim < 1 || p.value_dim < 0)
    throw std::invalid_argument("bspf CUDA kernels: invalid problem sizes");
}

bool empty(const Problem& p) { return p.batch == 0 || p.heads == 0 || p.seqlen == 0; }

// Makes `device` current for this thread's runtime and checks that the problem fits.
void prepare(const Problem& p, int32_t device) {
  check(cudaSetDevice(device), "selecting the CUDA device (is an NVIDIA GPU with a working driver present?)");
  int optin = 0;
  check(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
        "querying the device's shared memory");
  const int64_t chunks = (p.seqlen + p.block_size - 1) / p.block_size;
  const size_t bytes = shared_bytes_chunks(p.dtype, p.block_size, chunks);
  if (bytes > static_cast<size_t>(optin))
    throw std::invalid_argument("seqlen N = " + std::to_string(p.seqlen) + " is too long for the bspf CUDA kernels (" +
                                dtype_name(p.dtype) + ", block_size " + std::to_string(p.block_size) +
                                "): the largest supported N on this device is " +
                                std::to_string(max_seqlen(p.dtype, p.block_size, device)));
}

void require(const void* pointer, const char* name) {
  if (pointer == nullptr) throw std::invalid_argument(std::string("bspf CUDA kernels: ") + name + " is null");
}

// Every buffer the forward saves for the backward.
void require_saved(const Saved& saved) {
  require(saved.mask_words, "mask_words");
  require(saved.match, "match");
  require(saved.rho, "rho");
  require(saved.lse, "lse");
  require(saved.row_sum, "row_sum");
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

}  // namespace

int64_t shared_bytes(DType dtype, int32_t block_size, int64_t seqlen) {
  return static_cast<int64_t>(shared_bytes_chunks(dtype, block_size, (seqlen + block_size - 1) / block_size));
}

int64_t max_seqlen(DType dtype, int32_t block_size, int32_t device) {
  if (block_size < 1 || block_size > 64) throw std::invalid_argument("block_size must be in [1, 64]");
  int optin = 0;
  check(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
        "querying the device's shared memory");
  // The largest chunk count that fits (the need grows with it), times Ω.
  int64_t lo = 0, hi = int64_t{1} << 24;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (shared_bytes_chunks(dtype, block_size, mid) <= static_cast<size_t>(optin))
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo * block_size;
}

void mask(const ForwardParams& params, int32_t device, std::uintptr_t stream) {
  check_problem(params.p);
  if (empty(params.p)) return;
  require(params.qk, "qk");
  require(params.score_kernel, "score_kernel");
  require(params.saved.mask_words, "mask_words");
  prepare(params.p, device);
  by_dtype(params.p.dtype, [&](auto tag) {
    launch_mask<decltype(tag)>(params, reinterpret_cast<cudaStream_t>(stream));
  });
}

void forward(const ForwardParams& params, int32_t device, std::uintptr_t stream) {
  check_problem(params.p);
  if (empty(params.p)) return;
  require(params.qk, "qk");
  if (params.p.value_dim > 0) require(params.v, "v");
  require(params.score_kernel, "score_kernel");
  require_saved(params.saved);
  if (params.p.value_dim > 0) require(params.out, "out");
  prepare(params.p, device);
  by_dtype(params.p.dtype, [&](auto tag) {
    launch_forward<decltype(tag)>(params, reinterpret_cast<cudaStream_t>(stream));
  });
}

void backward(const BackwardParams& params, const BackwardWorkspace& workspace, int32_t device,
              std::uintptr_t stream) {
  check_problem(params.p);
  if (empty(params.p)) return;
  require(params.qk, "qk");
  require_saved(params.saved);
  require(params.grad_qk, "grad_qk");
  require(workspace.row_stats, "row_stats");
  require(workspace.grad_qk_acc, "grad_qk_acc");
  if (params.p.value_dim > 0) {
    require(params.grad_out, "grad_out");
    require(params.v, "v");
    require(params.grad_v, "grad_v");
    require(workspace.grad_v_acc, "grad_v_acc");
  }
  prepare(params.p, device);
  by_dtype(params.p.dtype, [&](auto tag) {
    launch_backward<decltype(tag)>(params, workspace, reinterpret_cast<cudaStream_t>(stream));
  });
}

}  // namespace bspf::cuda
