// What the emulator's runtime API (runtime_api.cpp) shares with its scheduler: the
// error state and the launch limits of the emulated device.
#pragma once

#include <cstddef>
#include <string>

namespace bspf_emulation {

// The emulated device: one GPU with an H100's limits.
constexpr int kSharedPerBlockOptin = 232448;    // cudaDevAttrMaxSharedMemoryPerBlockOptin
constexpr int kSharedPerBlockDefault = 48 * 1024;  // without cudaFuncSetAttribute
constexpr int kMultiprocessors = 132;
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr unsigned kMaxGridX = 0x7FFFFFFFu, kMaxGridYZ = 65535;
constexpr unsigned kMaxBlockXY = 1024, kMaxBlockZ = 64;

// Makes `code` the calling thread's last error, with `detail` appended to its
// cudaGetErrorString text; returns code.
int record_error(int code, const std::string& detail);

// The dynamic shared memory a launch of `kernel` may use: 48 KB unless raised with
// cudaFuncSetAttribute(cudaFuncAttributeMaxDynamicSharedMemorySize).
size_t dynamic_smem_limit(const void* kernel);

}  // namespace bspf_emulation
