// The CUDA runtime functions of the shim (cuda_runtime.h) other than the launch itself:
// device selection and attributes, function attributes, versions, errors, and the
// memory functions (host memory is device memory).
#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>

#include "runtime_state.h"

namespace bspf_emulation {
namespace {

thread_local int t_device = 0;
thread_local cudaError_t t_last_error = cudaSuccess;
thread_local std::string t_detail;  // of the last error recorded
thread_local cudaError_t t_detail_code = cudaSuccess;
thread_local std::string t_message;  // what cudaGetErrorString returned last

std::mutex g_attributes_mutex;
std::map<const void*, size_t>& smem_limits() {
  static std::map<const void*, size_t> limits;
  return limits;
}

const char* standard_string(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInitializationError: return "initialization error";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInsufficientDriver: return "CUDA driver version is insufficient for CUDA runtime version";
    case cudaErrorInvalidDeviceFunction: return "invalid device function";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
    case cudaErrorAssert: return "device-side assert triggered";
    case cudaErrorIllegalInstruction: return "an illegal instruction was encountered";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    case cudaErrorNotSupported: return "operation not supported";
    case cudaErrorUnknown: return "unknown error";
  }
  return "unrecognized error code";
}

cudaError_t fail_with(cudaError_t code, const std::string& detail) {
  return static_cast<cudaError_t>(record_error(code, detail));
}

}  // namespace

int record_error(int code, const std::string& detail) {
  t_last_error = static_cast<cudaError_t>(code);
  t_detail = detail;
  t_detail_code = static_cast<cudaError_t>(code);
  return code;
}

size_t dynamic_smem_limit(const void* kernel) {
  std::lock_guard<std::mutex> lock(g_attributes_mutex);
  const auto it = smem_limits().find(kernel);
  return it == smem_limits().end() ? kSharedPerBlockDefault : it->second;
}

cudaError_t set_function_attribute(const void* kernel, cudaFuncAttribute attr, int value) {
  if (kernel == nullptr) return fail_with(cudaErrorInvalidDeviceFunction, "cudaFuncSetAttribute: null kernel");
  switch (attr) {
    case cudaFuncAttributeMaxDynamicSharedMemorySize:
      if (value < 0 || value > kSharedPerBlockOptin)
        return fail_with(cudaErrorInvalidValue, "cudaFuncSetAttribute: " + std::to_string(value) +
                                                    " bytes of dynamic shared memory is above the device's " +
                                                    std::to_string(kSharedPerBlockOptin));
      {
        std::lock_guard<std::mutex> lock(g_attributes_mutex);
        smem_limits()[kernel] = static_cast<size_t>(value);
      }
      return cudaSuccess;
    case cudaFuncAttributePreferredSharedMemoryCarveout:
      return value < -1 || value > 100 ? fail_with(cudaErrorInvalidValue, "cudaFuncSetAttribute: bad carveout")
                                       : cudaSuccess;
  }
  return fail_with(cudaErrorInvalidValue, "cudaFuncSetAttribute: attribute not emulated");
}

}  // namespace bspf_emulation

using bspf_emulation::fail_with;

cudaError_t cudaGetLastError() {
  const cudaError_t e = bspf_emulation::t_last_error;
  bspf_emulation::t_last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError() { return bspf_emulation::t_last_error; }

#define BSPF_EMULATION_NAME(e) \
  case e: return #e;
const char* cudaGetErrorName(cudaError_t error) {
  switch (error) {
    BSPF_EMULATION_NAME(cudaSuccess)
    BSPF_EMULATION_NAME(cudaErrorInvalidValue)
    BSPF_EMULATION_NAME(cudaErrorMemoryAllocation)
    BSPF_EMULATION_NAME(cudaErrorInitializationError)
    BSPF_EMULATION_NAME(cudaErrorInvalidConfiguration)
    BSPF_EMULATION_NAME(cudaErrorInsufficientDriver)
    BSPF_EMULATION_NAME(cudaErrorInvalidDeviceFunction)
    BSPF_EMULATION_NAME(cudaErrorNoDevice)
    BSPF_EMULATION_NAME(cudaErrorInvalidDevice)
    BSPF_EMULATION_NAME(cudaErrorIllegalAddress)
    BSPF_EMULATION_NAME(cudaErrorLaunchOutOfResources)
    BSPF_EMULATION_NAME(cudaErrorAssert)
    BSPF_EMULATION_NAME(cudaErrorIllegalInstruction)
    BSPF_EMULATION_NAME(cudaErrorLaunchFailure)
    BSPF_EMULATION_NAME(cudaErrorNotSupported)
    BSPF_EMULATION_NAME(cudaErrorUnknown)
  }
  return "cudaErrorUnknown";
}
#undef BSPF_EMULATION_NAME

// The standard text, plus what the emulator found when this is the code it recorded last.
const char* cudaGetErrorString(cudaError_t error) {
  using namespace bspf_emulation;
  t_message = standard_string(error);
  if (error != cudaSuccess && error == t_detail_code && !t_detail.empty()) t_message += " [emulated CUDA: " + t_detail + "]";
  return t_message.c_str();
}

cudaError_t cudaGetDeviceCount(int* count) {
  if (count == nullptr) return fail_with(cudaErrorInvalidValue, "cudaGetDeviceCount: null pointer");
  *count = 1;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) {
  if (device != 0)
    return fail_with(cudaErrorInvalidDevice, "the emulator has one device (0), not " + std::to_string(device));
  bspf_emulation::t_device = device;
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int* device) {
  if (device == nullptr) return fail_with(cudaErrorInvalidValue, "cudaGetDevice: null pointer");
  *device = bspf_emulation::t_device;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  using namespace bspf_emulation;
  if (value == nullptr) return fail_with(cudaErrorInvalidValue, "cudaDeviceGetAttribute: null pointer");
  if (device != 0)
    return fail_with(cudaErrorInvalidDevice, "the emulator has one device (0), not " + std::to_string(device));
  switch (attr) {  // an H100 SXM (compute capability 9.0)
    case cudaDevAttrMaxThreadsPerBlock: *value = kMaxThreadsPerBlock; break;
    case cudaDevAttrMaxBlockDimX:
    case cudaDevAttrMaxBlockDimY: *value = kMaxBlockXY; break;
    case cudaDevAttrMaxBlockDimZ: *value = kMaxBlockZ; break;
    case cudaDevAttrMaxGridDimX: *value = static_cast<int>(kMaxGridX); break;
    case cudaDevAttrMaxGridDimY:
    case cudaDevAttrMaxGridDimZ: *value = kMaxGridYZ; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = kSharedPerBlockDefault; break;
    case cudaDevAttrTotalConstantMemory: *value = 65536; break;
    case cudaDevAttrWarpSize: *value = 32; break;
    case cudaDevAttrMaxRegistersPerBlock: *value = 65536; break;
    case cudaDevAttrClockRate: *value = 1980000; break;
    case cudaDevAttrMultiProcessorCount: *value = kMultiprocessors; break;
    case cudaDevAttrL2CacheSize: *value = 50 * 1024 * 1024; break;
    case cudaDevAttrMaxThreadsPerMultiProcessor: *value = 2048; break;
    case cudaDevAttrComputeCapabilityMajor: *value = 9; break;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = 233472; break;
    case cudaDevAttrMaxRegistersPerMultiprocessor: *value = 65536; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = kSharedPerBlockOptin; break;
    default: return fail_with(cudaErrorInvalidValue, "device attribute " + std::to_string(attr) + " is not emulated");
  }
  return cudaSuccess;
}

// 13000 for both, like a CUDA 13.0 runtime on a matching driver. BSPF_EMULATION_DRIVER_VERSION
// sets the driver's, to exercise a version check against an older driver.
cudaError_t cudaDriverGetVersion(int* version) {
  if (version == nullptr) return fail_with(cudaErrorInvalidValue, "cudaDriverGetVersion: null pointer");
  const char* forced = std::getenv("BSPF_EMULATION_DRIVER_VERSION");
  *version = forced != nullptr && *forced != '\0' ? std::atoi(forced) : 13000;
  return cudaSuccess;
}

cudaError_t cudaRuntimeGetVersion(int* version) {
  if (version == nullptr) return fail_with(cudaErrorInvalidValue, "cudaRuntimeGetVersion: null pointer");
  *version = CUDART_VERSION;
  return cudaSuccess;
}

// Launches run to completion before they return: there is nothing to wait for.
cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }

cudaError_t cudaMemsetAsync(void* dst, int value, size_t count, cudaStream_t) {
  if (count != 0 && dst == nullptr) return fail_with(cudaErrorInvalidValue, "cudaMemsetAsync: null pointer");
  if (count != 0) std::memset(dst, value, count);
  return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t count, cudaMemcpyKind, cudaStream_t) {
  if (count != 0 && (dst == nullptr || src == nullptr))
    return fail_with(cudaErrorInvalidValue, "cudaMemcpyAsync: null pointer");
  if (count != 0) std::memmove(dst, src, count);
  return cudaSuccess;
}

cudaError_t cudaMemset(void* dst, int value, size_t count) { return cudaMemsetAsync(dst, value, count, nullptr); }
cudaError_t cudaMemcpy(void* dst, const void* src, size_t count, cudaMemcpyKind kind) {
  return cudaMemcpyAsync(dst, src, count, kind, nullptr);
}
