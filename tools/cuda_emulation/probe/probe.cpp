// Test kernels for the emulator itself, behind a C interface that
// tests/cuda_emulation loads with ctypes: fp16/bf16 conversions, every warp intrinsic
// on chosen lanes and masks, the host side of csrc/cuda/mma.cuh, and small kernels that
// are wrong on purpose (divergent shuffles and barriers, races, out-of-bounds shared
// memory) so that the tests can check what the emulator and the sanitizers report.
//
// Every entry point returns a cudaError_t value; on failure `error` receives
// cudaGetErrorString's text.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>

#if __has_include("mma.cuh")
#include "mma.cuh"
#define BSPF_PROBE_HAS_MMA 1
#endif

#define BSPF_PROBE_API extern "C" __attribute__((visibility("default")))

namespace {

int finish(cudaError_t status, char* error, size_t error_size) {
  if (error != nullptr && error_size > 0) {
    const char* text = status == cudaSuccess ? "" : cudaGetErrorString(status);
    std::snprintf(error, error_size, "%s", text);
  }
  return static_cast<int>(status);
}

template <typename... P, typename... Args>
cudaError_t launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t shared_bytes, Args... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = shared_bytes;
  return cudaLaunchKernelEx(&config, kernel, args...);
}

bool is(const char* a, const char* b) { return std::strcmp(a, b) == 0; }

// ------------------------------------------------------------ warp intrinsics

enum class Op {
  kShfl, kShflUp, kShflDown, kShflXor, kShflXor64, kBallot, kAny, kAll, kMatchAny, kMatchAll,
  kReduceAdd, kReduceMin, kReduceMax, kReduceMinSigned, kReduceMaxSigned, kReduceAnd, kReduceOr, kReduceXor,
  kSyncwarp, kUnknown
};

Op op_named(const char* name) {
  static const struct {
    const char* name;
    Op op;
  } table[] = {{"shfl", Op::kShfl}, {"shfl_up", Op::kShflUp}, {"shfl_down", Op::kShflDown},
               {"shfl_xor", Op::kShflXor}, {"shfl_xor64", Op::kShflXor64}, {"ballot", Op::kBallot},
               {"any", Op::kAny}, {"all", Op::kAll}, {"match_any", Op::kMatchAny}, {"match_all", Op::kMatchAll},
               {"reduce_add", Op::kReduceAdd}, {"reduce_min", Op::kReduceMin}, {"reduce_max", Op::kReduceMax},
               {"reduce_min_signed", Op::kReduceMinSigned}, {"reduce_max_signed", Op::kReduceMaxSigned},
               {"reduce_and", Op::kReduceAnd}, {"reduce_or", Op::kReduceOr}, {"reduce_xor", Op::kReduceXor},
               {"syncwarp", Op::kSyncwarp}};
  for (const auto& e : table)
    if (is(name, e.name)) return e.op;
  return Op::kUnknown;
}

struct WarpCase {
  Op op;
  unsigned active, mask;
  int width;
  const unsigned* values;
  const unsigned* args;
  unsigned long long* results;
};

// One warp; lanes outside `active` return at once, the others call the intrinsic.
__global__ void warp_op_kernel(WarpCase c) {
  const int lane = threadIdx.x;
  if (!(c.active >> lane & 1u)) return;
  const unsigned v = c.values[lane], a = c.args[lane];
  unsigned long long r = 0;
  switch (c.op) {
    case Op::kShfl: r = __shfl_sync(c.mask, v, static_cast<int>(a), c.width); break;
    case Op::kShflUp: r = __shfl_up_sync(c.mask, v, a, c.width); break;
    case Op::kShflDown: r = __shfl_down_sync(c.mask, v, a, c.width); break;
    case Op::kShflXor: r = __shfl_xor_sync(c.mask, v, static_cast<int>(a), c.width); break;
    case Op::kShflXor64: {
      const unsigned long long wide = (static_cast<unsigned long long>(v) << 32) | (~v & 0xFFFFFFFFu);
      r = __shfl_xor_sync(c.mask, wide, static_cast<int>(a), c.width);
      break;
    }
    case Op::kBallot: r = __ballot_sync(c.mask, static_cast<int>(v)); break;
    case Op::kAny: r = static_cast<unsigned>(__any_sync(c.mask, static_cast<int>(v))); break;
    case Op::kAll: r = static_cast<unsigned>(__all_sync(c.mask, static_cast<int>(v))); break;
    case Op::kMatchAny: r = __match_any_sync(c.mask, v); break;
    case Op::kMatchAll: {
      int pred = -1;
      const unsigned m = __match_all_sync(c.mask, v, &pred);
      r = (static_cast<unsigned long long>(pred) << 32) | m;
      break;
    }
    case Op::kReduceAdd: r = __reduce_add_sync(c.mask, v); break;
    case Op::kReduceMin: r = __reduce_min_sync(c.mask, v); break;
    case Op::kReduceMax: r = __reduce_max_sync(c.mask, v); break;
    case Op::kReduceMinSigned: r = static_cast<unsigned>(__reduce_min_sync(c.mask, static_cast<int>(v))); break;
    case Op::kReduceMaxSigned: r = static_cast<unsigned>(__reduce_max_sync(c.mask, static_cast<int>(v))); break;
    case Op::kReduceAnd: r = __reduce_and_sync(c.mask, v); break;
    case Op::kReduceOr: r = __reduce_or_sync(c.mask, v); break;
    case Op::kReduceXor: r = __reduce_xor_sync(c.mask, v); break;
    case Op::kSyncwarp: __syncwarp(c.mask); r = 1; break;
    case Op::kUnknown: break;
  }
  c.results[lane] = r;
}

// ---------------------------------------------------------------- barriers

__global__ void barrier_reduce_kernel(int op, const int* predicates, int* results) {
  const int t = threadIdx.x, p = predicates[t];
  results[t] = op == 0 ? __syncthreads_count(p) : op == 1 ? __syncthreads_and(p) : __syncthreads_or(p);
}

// ------------------------------------------------------------------ exchange

__global__ void exchange_kernel(unsigned bytes, unsigned char* out) {
  const int lane = bspf_emulation::lane_id();
  unsigned char mine[64], all[32 * 64];
  for (unsigned i = 0; i < bytes; ++i) mine[i] = static_cast<unsigned char>(lane * 31 + i);
  bspf_emulation::warp_exchange(mine, all, bytes);
  std::memcpy(out + static_cast<size_t>(lane) * 32 * bytes, all, 32 * bytes);
}

// ---------------------------------------------------------------------- mma

#if defined(BSPF_PROBE_HAS_MMA)
// One warp computes D = A·B + C. The fragments are filled from the layout table in
// mma.cuh's comment (g = lane >> 2, t = lane & 3), not from its helpers, so that the
// helpers are what is tested. A is 16×16 row-major, B 16×8 as B[k][n] row-major, C and
// D 16×8 row-major.
template <typename H>
__global__ void mma_kernel(const H* a, const H* b, const float* c, float* d) {
  using bspf::cuda::pack2;
  const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
  const uint32_t af[4] = {pack2(a[g * 16 + 2 * t], a[g * 16 + 2 * t + 1]),
                          pack2(a[(g + 8) * 16 + 2 * t], a[(g + 8) * 16 + 2 * t + 1]),
                          pack2(a[g * 16 + 2 * t + 8], a[g * 16 + 2 * t + 9]),
                          pack2(a[(g + 8) * 16 + 2 * t + 8], a[(g + 8) * 16 + 2 * t + 9])};
  const uint32_t bf[2] = {pack2(b[(2 * t) * 8 + g], b[(2 * t + 1) * 8 + g]),
                          pack2(b[(2 * t + 8) * 8 + g], b[(2 * t + 9) * 8 + g])};
  const float cf[4] = {c[g * 8 + 2 * t], c[g * 8 + 2 * t + 1], c[(g + 8) * 8 + 2 * t], c[(g + 8) * 8 + 2 * t + 1]};
  float df[4];
  bspf::cuda::mma_m16n8k16<H>(df, af, bf, cf);
  d[g * 8 + 2 * t] = df[0];
  d[g * 8 + 2 * t + 1] = df[1];
  d[(g + 8) * 8 + 2 * t] = df[2];
  d[(g + 8) * 8 + 2 * t + 1] = df[3];
}
#endif

// --------------------------------------------------------------- scenarios

// Kernels that break a rule, or check one (see bspf_probe_scenario).
__global__ void shfl_with_exited_lanes(long long* out) {
  if (threadIdx.x >= 16) return;
  out[threadIdx.x] = __shfl_xor_sync(0xFFFFFFFFu, static_cast<int>(threadIdx.x), 1);
}

__global__ void shfl_against_ballot(long long* out) {
  if (threadIdx.x % 2 == 0)
    out[threadIdx.x] = __shfl_sync(0xFFFFFFFFu, 1, 0);
  else
    out[threadIdx.x] = __ballot_sync(0xFFFFFFFFu, 1);
}

__global__ void shfl_against_syncthreads(long long* out) {
  if (threadIdx.x < 16) {
    out[threadIdx.x] = __shfl_sync(0xFFFFFFFFu, 1, 0);
  } else {
    __syncthreads();
    out[threadIdx.x] = 0;
  }
}

__global__ void syncthreads_at_two_lines(long long* out) {
  if (threadIdx.x < 64) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

// Threads 64.. return first: the others' barrier completes (they count as arrived).
__global__ void syncthreads_after_exit(long long* out) {
  if (threadIdx.x >= 64) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void mask_without_caller(long long* out) { out[threadIdx.x] = __shfl_sync(0x2u, 1, 1); }

// Two half-warps shuffle independently under disjoint masks: legal.
__global__ void disjoint_masks(long long* out) {
  const unsigned lane = threadIdx.x;
  const unsigned mask = lane < 16 ? 0x0000FFFFu : 0xFFFF0000u;
  out[lane] = __shfl_sync(mask, static_cast<int>(lane), lane < 16 ? 15 : 16);
}

__global__ void widths_differ(long long* out) {
  out[threadIdx.x] = __shfl_xor_sync(0xFFFFFFFFu, 1, 1, threadIdx.x < 16 ? 16 : 32);
}

__global__ void width_not_power_of_two(long long* out) { out[threadIdx.x] = __shfl_xor_sync(0xFFFFFFFFu, 1, 1, 12); }

__global__ void trap_in_thread(long long* out) {
  if (threadIdx.x == 5) __trap();
  out[threadIdx.x] = 1;
}

// Reads shared memory it never wrote: 0xFF bytes, a NaN.
__global__ void read_unwritten_shared(long long* out) {
  extern __shared__ __align__(16) unsigned char smem[];
  float f;
  std::memcpy(&f, smem + 4 * threadIdx.x, 4);
  out[threadIdx.x] = f != f;  // NaN
}

// One byte past the end of the dynamic shared memory (AddressSanitizer must see it).
__global__ void shared_out_of_bounds(long long* out, unsigned bytes) {
  extern __shared__ __align__(16) unsigned char smem[];
  volatile unsigned char* p = smem;
  if (threadIdx.x == 0) out[0] = p[bytes];
}

// Thread 40 (warp 1) reads what thread 0 wrote, with or without a barrier between.
__global__ void shared_handoff(long long* out, int synced) {
  extern __shared__ __align__(16) unsigned char smem[];
  int* cell = reinterpret_cast<int*>(smem);
  if (threadIdx.x == 0) *cell = 42;
  if (synced) __syncthreads();
  if (threadIdx.x == 40) out[0] = *cell;
}

// Lane 1 reads what lane 0 wrote, ordered by __syncwarp.
__global__ void syncwarp_handoff(long long* out) {
  extern __shared__ __align__(16) unsigned char smem[];
  int* cell = reinterpret_cast<int*>(smem);
  if (threadIdx.x == 0) *cell = 7;
  __syncwarp();
  if (threadIdx.x == 1) out[0] = *cell;
}

// Every CTA writes out[0]: a race between CTAs.
__global__ void ctas_write_one_address(long long* out) {
  if (threadIdx.x == 0) out[0] = blockIdx.x;
}

__global__ void signed_overflow(long long* out) {
  volatile int big = INT_MAX;
  out[threadIdx.x] = big + static_cast<int>(threadIdx.x + 1);
}

__global__ void big_shared(long long* out) {
  extern __shared__ __align__(16) unsigned char smem[];
  smem[64 * 1024 - 1] = 1;
  out[threadIdx.x] = smem[64 * 1024 - 1];
}

__global__ void nothing(long long*) {}

}  // namespace

// Conversions between float and the 16-bit formats, element by element.
BSPF_PROBE_API int bspf_probe_convert(const char* kind, const void* src, void* dst, int64_t n) {
  auto map = [&](auto fn, auto in_tag, auto out_tag) {
    using In = decltype(in_tag);
    using Out = decltype(out_tag);
    const In* s = static_cast<const In*>(src);
    Out* d = static_cast<Out*>(dst);
    for (int64_t i = 0; i < n; ++i) d[i] = fn(s[i]);
  };
  if (is(kind, "float2half_rn")) map(__float2half_rn, float{}, __half{});
  else if (is(kind, "float2half_rz")) map(__float2half_rz, float{}, __half{});
  else if (is(kind, "float2half_rd")) map(__float2half_rd, float{}, __half{});
  else if (is(kind, "float2half_ru")) map(__float2half_ru, float{}, __half{});
  else if (is(kind, "half2float")) map(__half2float, __half{}, float{});
  else if (is(kind, "float2bfloat16_rn")) map(__float2bfloat16_rn, float{}, __nv_bfloat16{});
  else if (is(kind, "float2bfloat16_rz")) map(__float2bfloat16_rz, float{}, __nv_bfloat16{});
  else if (is(kind, "float2bfloat16_rd")) map(__float2bfloat16_rd, float{}, __nv_bfloat16{});
  else if (is(kind, "float2bfloat16_ru")) map(__float2bfloat16_ru, float{}, __nv_bfloat16{});
  else if (is(kind, "bfloat162float")) map(__bfloat162float, __nv_bfloat16{}, float{});
  else return static_cast<int>(cudaErrorInvalidValue);
  return 0;
}

// One warp intrinsic (`op`) on the lanes in `active`, each passing values[lane] and
// args[lane] (source lane, delta or lane mask); results[lane] for the active lanes.
BSPF_PROBE_API int bspf_probe_warp_op(const char* op, unsigned active, unsigned mask, const unsigned* values,
                                      const unsigned* args, int width, unsigned long long* results, char* error,
                                      size_t error_size) {
  const Op o = op_named(op);
  if (o == Op::kUnknown) return finish(cudaErrorInvalidValue, error, error_size);
  const WarpCase c{o, active, mask, width, values, args, results};
  return finish(launch(warp_op_kernel, dim3(1), dim3(32), 0, c), error, error_size);
}

// __syncthreads_count / _and / _or (op 0, 1, 2) over `threads` threads.
BSPF_PROBE_API int bspf_probe_barrier_reduce(int op, int threads, const int* predicates, int* results, char* error,
                                             size_t error_size) {
  return finish(launch(barrier_reduce_kernel, dim3(1), dim3(static_cast<unsigned>(threads)), 0, op, predicates,
                       results),
                error, error_size);
}

// bspf_emulation::warp_exchange of `bytes` (≤ 64) per lane; out is 32 × 32 × bytes.
BSPF_PROBE_API int bspf_probe_exchange(unsigned bytes, unsigned char* out, char* error, size_t error_size) {
  if (bytes == 0 || bytes > 64) return finish(cudaErrorInvalidValue, error, error_size);
  return finish(launch(exchange_kernel, dim3(1), dim3(32), 0, bytes, out), error, error_size);
}

// mma.sync m16n8k16 through csrc/cuda/mma.cuh: `bf16` selects the operand type; a, b
// hold the 16-bit patterns.
BSPF_PROBE_API int bspf_probe_mma(int bf16, const uint16_t* a, const uint16_t* b, const float* c, float* d,
                                  char* error, size_t error_size) {
#if defined(BSPF_PROBE_HAS_MMA)
  const cudaError_t status =
      bf16 ? launch(mma_kernel<__nv_bfloat16>, dim3(1), dim3(32), 0, reinterpret_cast<const __nv_bfloat16*>(a),
                    reinterpret_cast<const __nv_bfloat16*>(b), c, d)
           : launch(mma_kernel<__half>, dim3(1), dim3(32), 0, reinterpret_cast<const __half*>(a),
                    reinterpret_cast<const __half*>(b), c, d);
  return finish(status, error, error_size);
#else
  (void)bf16, (void)a, (void)b, (void)c, (void)d;
  if (error != nullptr && error_size > 0) std::snprintf(error, error_size, "csrc/cuda/mma.cuh is missing");
  return static_cast<int>(cudaErrorNotSupported);
#endif
}

// A named kernel that breaks (or checks) one rule; out has room for 256 values.
BSPF_PROBE_API int bspf_probe_scenario(const char* name, long long* out, char* error, size_t error_size) {
  cudaError_t status = cudaErrorInvalidValue;
  auto run = [&](auto kernel, unsigned threads, size_t shared_bytes = 0) {
    status = launch(kernel, dim3(1), dim3(threads), shared_bytes, out);
  };
  if (is(name, "shfl_with_exited_lanes")) run(shfl_with_exited_lanes, 32);
  else if (is(name, "shfl_against_ballot")) run(shfl_against_ballot, 32);
  else if (is(name, "shfl_against_syncthreads")) run(shfl_against_syncthreads, 32);
  else if (is(name, "syncthreads_at_two_lines")) run(syncthreads_at_two_lines, 128);
  else if (is(name, "syncthreads_after_exit")) run(syncthreads_after_exit, 128);
  else if (is(name, "mask_without_caller")) run(mask_without_caller, 32);
  else if (is(name, "disjoint_masks")) run(disjoint_masks, 32);
  else if (is(name, "widths_differ")) run(widths_differ, 32);
  else if (is(name, "width_not_power_of_two")) run(width_not_power_of_two, 32);
  else if (is(name, "trap_in_thread")) run(trap_in_thread, 32);
  else if (is(name, "read_unwritten_shared")) run(read_unwritten_shared, 64, 256);
  else if (is(name, "shared_out_of_bounds"))
    status = launch(shared_out_of_bounds, dim3(1), dim3(32), 100, out, 100u);
  else if (is(name, "shared_unsynced")) status = launch(shared_handoff, dim3(1), dim3(64), 16, out, 0);
  else if (is(name, "shared_synced")) status = launch(shared_handoff, dim3(1), dim3(64), 16, out, 1);
  else if (is(name, "syncwarp_handoff")) run(syncwarp_handoff, 32, 16);
  else if (is(name, "ctas_write_one_address")) status = launch(ctas_write_one_address, dim3(4), dim3(32), 0, out);
  else if (is(name, "signed_overflow")) run(signed_overflow, 32);
  else if (is(name, "shared_64k_without_attribute")) run(big_shared, 32, 64 * 1024);
  else if (is(name, "shared_64k_with_attribute")) {
    status = cudaFuncSetAttribute(big_shared, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024);
    if (status == cudaSuccess) run(big_shared, 32, 64 * 1024);
  } else if (is(name, "shared_above_optin")) {
    status = cudaFuncSetAttribute(nothing, cudaFuncAttributeMaxDynamicSharedMemorySize, 232448 + 1);
  } else if (is(name, "launch_above_optin")) {
    status = cudaFuncSetAttribute(nothing, cudaFuncAttributeMaxDynamicSharedMemorySize, 232448);
    if (status == cudaSuccess) run(nothing, 32, 232448 + 16);
  } else if (is(name, "block_too_large")) run(nothing, 2048);
  else if (is(name, "grid_y_too_large")) status = launch(nothing, dim3(1, 65536), dim3(32), 0, out);
  return finish(status, error, error_size);
}
