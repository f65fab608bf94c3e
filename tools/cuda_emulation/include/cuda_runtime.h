// Host emulation of the parts of the CUDA runtime the bspf kernels use, so that
// csrc/cuda (api.cu, launch.cuh, the kernels) compiles with g++ as C++17 with
// -DBSPF_CUDA_EMULATION and runs on the CPU: every CTA's threads run as fibers on the
// calling thread (src/scheduler.cpp). __CUDA_ARCH__ stays undefined: this is host code.
// See ../README.md for what is and is not emulated.
#pragma once

#include <math.h>  // the C math functions in the global namespace, with float overloads

#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#include "bspf_emulation/scheduler.h"
#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "emulated_warp.h"

#define CUDART_VERSION 13000

// ------------------------------------------------------------------ keywords

#define __global__
#define __device__
#define __host__
#define __constant__
#define __grid_constant__
#define __forceinline__ inline
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
// Shared memory is one block per CTA, and one CTA runs at a time on an OS thread: a
// thread_local object is exactly that. (`extern __shared__` stays a declaration.)
#define __shared__ thread_local

// The kernels' `extern __shared__ __align__(16) unsigned char smem[];` declares, at
// block scope in namespace bspf::cuda, a pointer to the running CTA's dynamic shared
// memory: an exactly sized heap block filled with 0xFF bytes (so AddressSanitizer sees
// accesses past its end and reads of unwritten floats are NaN). The declaration names
// bspf_emulation_smem in the kernel's innermost namespace; src/scheduler.cpp defines it
// for bspf::cuda, anonymous namespaces (also inside bspf::cuda) and the global one.
// (So no other identifier in kernel code may be called `smem`.)
#define smem (*bspf_emulation_smem)

// ----------------------------------------------------------------- built-ins

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};

// The running thread's built-in variables: globals, set by the scheduler before it
// resumes a thread (src/scheduler.cpp). Not macros, since structs such as
// cudaLaunchConfig_t have members of the same names.
extern uint3 threadIdx, blockIdx;
extern dim3 blockDim, gridDim;

// -------------------------------------------------------------- vector types

#define BSPF_EMULATION_VEC2(name, T, align) \
  struct __attribute__((aligned(align))) name { T x, y; }; \
  inline name make_##name(T x, T y) { return name{x, y}; }
#define BSPF_EMULATION_VEC4(name, T, align) \
  struct __attribute__((aligned(align))) name { T x, y, z, w; }; \
  inline name make_##name(T x, T y, T z, T w) { return name{x, y, z, w}; }
BSPF_EMULATION_VEC2(float2, float, 8)
BSPF_EMULATION_VEC4(float4, float, 16)
BSPF_EMULATION_VEC2(double2, double, 16)
BSPF_EMULATION_VEC2(int2, int, 8)
BSPF_EMULATION_VEC4(int4, int, 16)
BSPF_EMULATION_VEC2(uint2, unsigned, 8)
BSPF_EMULATION_VEC4(uint4, unsigned, 16)
BSPF_EMULATION_VEC2(longlong2, long long, 16)
BSPF_EMULATION_VEC2(ulonglong2, unsigned long long, 16)
#undef BSPF_EMULATION_VEC2
#undef BSPF_EMULATION_VEC4

inline float2 __half22float2(__half2 h) { return float2{__half2float(h.x), __half2float(h.y)}; }
inline __half2 __float22half2_rn(float2 f) { return __floats2half2_rn(f.x, f.y); }
inline float2 __bfloat1622float2(__nv_bfloat162 h) { return float2{__bfloat162float(h.x), __bfloat162float(h.y)}; }
inline __nv_bfloat162 __float22bfloat162_rn(float2 f) { return __floats2bfloat162_rn(f.x, f.y); }

// ------------------------------------------------------- math and bit intrinsics

// The GPU contracts a·b + c into an FMA where nvcc sees one; the emulation is built
// with -ffp-contract=off, so only explicit fma/fmaf fuse (bit-level differences only).
using std::fmax;
using std::fmin;
using std::isfinite;
using std::isinf;
using std::isnan;

inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
inline float __saturatef(float x) { return x != x ? 0.0f : x < 0.0f ? 0.0f : x > 1.0f ? 1.0f : x; }

namespace bspf_emulation {
template <typename To, typename From>
inline To bit_cast(From from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast between types of one size");
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}
}  // namespace bspf_emulation

inline unsigned __float_as_uint(float f) { return bspf_emulation::bit_cast<unsigned>(f); }
inline int __float_as_int(float f) { return bspf_emulation::bit_cast<int>(f); }
inline float __uint_as_float(unsigned u) { return bspf_emulation::bit_cast<float>(u); }
inline float __int_as_float(int i) { return bspf_emulation::bit_cast<float>(i); }
inline long long __double_as_longlong(double d) { return bspf_emulation::bit_cast<long long>(d); }
inline double __longlong_as_double(long long i) { return bspf_emulation::bit_cast<double>(i); }

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
inline unsigned long long __brevll(unsigned long long x) {
  return (static_cast<unsigned long long>(__brev(static_cast<unsigned>(x))) << 32) | __brev(static_cast<unsigned>(x >> 32));
}
inline unsigned __umulhi(unsigned a, unsigned b) { return static_cast<unsigned>((uint64_t{a} * b) >> 32); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return static_cast<unsigned long long>((static_cast<unsigned __int128>(a) * b) >> 64);
}
inline unsigned __funnelshift_l(unsigned lo, unsigned hi, unsigned shift) {
  const uint64_t both = (uint64_t{hi} << 32) | lo;
  return static_cast<unsigned>((both << (shift & 31)) >> 32);
}
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned shift) {
  const uint64_t both = (uint64_t{hi} << 32) | lo;
  return static_cast<unsigned>(both >> (shift & 31));
}

// CUDA's global min/max overloads.
#define BSPF_EMULATION_MINMAX(T) \
  inline T min(T a, T b) { return b < a ? b : a; } \
  inline T max(T a, T b) { return a < b ? b : a; }
BSPF_EMULATION_MINMAX(int)
BSPF_EMULATION_MINMAX(unsigned)
BSPF_EMULATION_MINMAX(long)
BSPF_EMULATION_MINMAX(unsigned long)
BSPF_EMULATION_MINMAX(long long)
BSPF_EMULATION_MINMAX(unsigned long long)
#undef BSPF_EMULATION_MINMAX
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

// ------------------------------------------------------------------- atomics

// The CTA's fibers never preempt one another, but the atomics are real atomics anyway
// so that ThreadSanitizer sees them as synchronised accesses.
template <typename T>
inline T atomicAdd(T* address, T value) {
  if constexpr (std::is_floating_point<T>::value) {
    T old = __atomic_load_n(address, __ATOMIC_RELAXED), desired;
    do {
      desired = old + value;
    } while (!__atomic_compare_exchange(address, &old, &desired, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
    return old;
  } else {
    return __atomic_fetch_add(address, value, __ATOMIC_RELAXED);
  }
}
template <typename T>
inline T atomicSub(T* address, T value) {
  return __atomic_fetch_sub(address, value, __ATOMIC_RELAXED);
}
template <typename T>
inline T atomicExch(T* address, T value) {
  return __atomic_exchange_n(address, value, __ATOMIC_RELAXED);
}
template <typename T>
inline T atomicCAS(T* address, T compare, T value) {
  __atomic_compare_exchange_n(address, &compare, value, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
  return compare;
}
template <typename T>
inline T atomicMax(T* address, T value) {
  T old = __atomic_load_n(address, __ATOMIC_RELAXED);
  while (old < value && !__atomic_compare_exchange_n(address, &old, value, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old;
}
template <typename T>
inline T atomicMin(T* address, T value) {
  T old = __atomic_load_n(address, __ATOMIC_RELAXED);
  while (value < old && !__atomic_compare_exchange_n(address, &old, value, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old;
}
template <typename T>
inline T atomicOr(T* address, T value) {
  return __atomic_fetch_or(address, value, __ATOMIC_RELAXED);
}
template <typename T>
inline T atomicAnd(T* address, T value) {
  return __atomic_fetch_and(address, value, __ATOMIC_RELAXED);
}
template <typename T>
inline T atomicXor(T* address, T value) {
  return __atomic_fetch_xor(address, value, __ATOMIC_RELAXED);
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

// -------------------------------------------------------------- runtime API

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInitializationError = 3,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInsufficientDriver = 35,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorNoDevice = 100,
  cudaErrorInvalidDevice = 101,
  cudaErrorIllegalAddress = 700,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorAssert = 710,
  cudaErrorIllegalInstruction = 715,
  cudaErrorLaunchFailure = 719,
  cudaErrorNotSupported = 801,
  cudaErrorUnknown = 999,
};
using cudaError = cudaError_t;

enum cudaDeviceAttr : int {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxBlockDimX = 2,
  cudaDevAttrMaxBlockDimY = 3,
  cudaDevAttrMaxBlockDimZ = 4,
  cudaDevAttrMaxGridDimX = 5,
  cudaDevAttrMaxGridDimY = 6,
  cudaDevAttrMaxGridDimZ = 7,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrTotalConstantMemory = 9,
  cudaDevAttrWarpSize = 10,
  cudaDevAttrMaxRegistersPerBlock = 12,
  cudaDevAttrClockRate = 13,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrL2CacheSize = 38,
  cudaDevAttrMaxThreadsPerMultiProcessor = 39,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81,
  cudaDevAttrMaxRegistersPerMultiprocessor = 82,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};

enum cudaFuncAttribute : int {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributePreferredSharedMemoryCarveout = 9,
};

enum cudaMemcpyKind : int {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4,
};

struct CUstream_st;
using cudaStream_t = CUstream_st*;

struct cudaLaunchAttribute;  // attributes are not emulated: attrs must be null
struct cudaLaunchConfig_t {
  dim3 gridDim;
  dim3 blockDim;
  size_t dynamicSmemBytes;
  cudaStream_t stream;
  cudaLaunchAttribute* attrs;
  unsigned int numAttrs;
};

cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorName(cudaError_t error);
const char* cudaGetErrorString(cudaError_t error);
cudaError_t cudaGetDeviceCount(int* count);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaDriverGetVersion(int* version);
cudaError_t cudaRuntimeGetVersion(int* version);
cudaError_t cudaDeviceSynchronize();
cudaError_t cudaStreamSynchronize(cudaStream_t stream);
// Host memory is device memory: these run at once.
cudaError_t cudaMemsetAsync(void* dst, int value, size_t count, cudaStream_t stream = nullptr);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t count, cudaMemcpyKind kind,
                            cudaStream_t stream = nullptr);
cudaError_t cudaMemset(void* dst, int value, size_t count);
cudaError_t cudaMemcpy(void* dst, const void* src, size_t count, cudaMemcpyKind kind);

namespace bspf_emulation {
cudaError_t set_function_attribute(const void* kernel, cudaFuncAttribute attr, int value);
}  // namespace bspf_emulation

template <typename T>
inline cudaError_t cudaFuncSetAttribute(T* kernel, cudaFuncAttribute attr, int value) {
  return bspf_emulation::set_function_attribute(reinterpret_cast<const void*>(kernel), attr, value);
}

// CUDA 12's typed launch: the arguments are converted to the kernel's parameter types
// once (on a GPU they are copied to constant memory), then every thread of every CTA
// calls the kernel with them.
template <typename... ExpTypes, typename... ActTypes>
inline cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* config, void (*kernel)(ExpTypes...),
                                      ActTypes&&... args) {
  static_assert(sizeof...(ExpTypes) == sizeof...(ActTypes), "cudaLaunchKernelEx: wrong number of arguments");
  struct Closure {
    void (*kernel)(ExpTypes...);
    std::tuple<std::decay_t<ExpTypes>...> params;
    static void run(void* self) {
      auto* c = static_cast<Closure*>(self);
      std::apply(c->kernel, c->params);
    }
  };
  if (config == nullptr || (config->numAttrs != 0 && config->attrs != nullptr)) return cudaErrorInvalidValue;
  Closure closure{kernel, std::tuple<std::decay_t<ExpTypes>...>(std::forward<ActTypes>(args)...)};
  const dim3 g = config->gridDim, b = config->blockDim;
  const bspf_emulation::LaunchShape shape{{g.x, g.y, g.z}, {b.x, b.y, b.z}, config->dynamicSmemBytes,
                                          static_cast<void*>(config->stream)};
  return static_cast<cudaError_t>(
      bspf_emulation::launch(shape, reinterpret_cast<const void*>(kernel), &Closure::run, &closure));
}
