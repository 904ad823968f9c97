// Plumbing shared by the CUDA kernels' host entry points (cuda/*.cu only: this header includes
// cuda_runtime.h, so the host-compiled bindings must not include it).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>

namespace astromer_fast {
namespace cuda {
namespace detail {

// Runs the launch on `device` and restores the caller's current device. torch keeps its own
// notion of the current device; a stale one here would launch on the wrong GPU.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    status_ = cudaGetDevice(&previous_);
    if (status_ != cudaSuccess) {
      cudaGetLastError();  // clear it so that it is reported once, here
      return;
    }
    if (previous_ != device) {
      status_ = cudaSetDevice(device);
      changed_ = status_ == cudaSuccess;
    }
  }
  ~DeviceGuard() {
    if (changed_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;
  cudaError_t status() const { return status_; }

 private:
  int previous_ = 0;
  bool changed_ = false;
  cudaError_t status_ = cudaSuccess;
};

// nullptr for cudaSuccess, otherwise the CUDA error string (the entry points' return convention).
inline const char* error_message(cudaError_t err) {
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

// The error of the last launch (cleared by reading it) as error_message() reports it.
inline const char* launch_error() { return error_message(cudaGetLastError()); }

// Same, prefixed with the kernel's name: "invalid configuration argument" alone does not say which
// of several launches failed. The text lives in a thread-local buffer that stays valid until this
// thread's next call, long enough for the binding to copy it into its exception.
inline const char* named_error(const char* kernel, cudaError_t err) {
  if (err == cudaSuccess) return nullptr;
  thread_local char buf[256];
  std::snprintf(buf, sizeof(buf), "%s: %s (%s)", kernel, cudaGetErrorString(err),
                cudaGetErrorName(err));
  return buf;
}
inline const char* launch_error(const char* kernel) {
  return named_error(kernel, cudaGetLastError());
}

// Grid size for a grid-stride kernel: `wanted` blocks, but at most `blocks_per_sm` resident
// blocks on each of the `sms` multiprocessors (the loop covers the rest), and at least one.
inline int capped_grid(long long wanted, long long blocks_per_sm, int sms) {
  return static_cast<int>(
      std::max<long long>(1, std::min<long long>(wanted, blocks_per_sm * std::max(sms, 1))));
}

}  // namespace detail
}  // namespace cuda
}  // namespace astromer_fast
