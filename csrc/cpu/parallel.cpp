// Attaching an OpenMP runtime that is already loaded in the process (see parallel.h for why).
#include "cpu/parallel.h"

#include <atomic>
#include <stdexcept>

#if defined(__linux__)
#include <dlfcn.h>
#endif

namespace astromer_fast {
namespace cpu {

namespace {
// Runtimes are never freed: a kernel on another thread may still hold the previous one.
std::atomic<const OpenMPRuntime*> g_runtime{nullptr};
}  // namespace

const OpenMPRuntime* openmp_runtime() { return g_runtime.load(std::memory_order_acquire); }

void detach_openmp() { g_runtime.store(nullptr, std::memory_order_release); }

std::string attach_openmp(const std::string& path) {
#if defined(__linux__)
  // RTLD_NOLOAD: only a library already in the process. Loading a runtime of our own is exactly
  // what must not happen. The handle is kept (never closed), so the library stays loaded.
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_NOLOAD);
  if (handle == nullptr) throw std::runtime_error("'" + path + "' is not loaded in this process");
  auto* rt = new OpenMPRuntime();
  rt->parallel = reinterpret_cast<decltype(rt->parallel)>(dlsym(handle, "GOMP_parallel"));
  rt->thread_num = reinterpret_cast<decltype(rt->thread_num)>(dlsym(handle, "omp_get_thread_num"));
  rt->num_threads = reinterpret_cast<decltype(rt->num_threads)>(dlsym(handle, "omp_get_num_threads"));
  if (rt->parallel == nullptr || rt->thread_num == nullptr || rt->num_threads == nullptr) {
    delete rt;
    throw std::runtime_error("'" + path + "' does not use an OpenMP runtime with the GNU entry points "
                             "(GOMP_parallel, omp_get_thread_num, omp_get_num_threads)");
  }
  Dl_info where{};
  rt->path = dladdr(reinterpret_cast<void*>(rt->parallel), &where) && where.dli_fname ? where.dli_fname : path;
  g_runtime.store(rt, std::memory_order_release);
  return rt->path;
#else
  (void)path;
  throw std::runtime_error("attaching an OpenMP runtime is only implemented on Linux");
#endif
}

}  // namespace cpu
}  // namespace astromer_fast
