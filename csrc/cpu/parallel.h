// A minimal parallel-for for the CPU kernels.
//
// The workers come from the process's OpenMP runtime when one has been attached (attach_openmp:
// the libgomp that torch's libtorch_cpu already loaded, found at run time; nothing is linked),
// else from std::thread. Why borrow torch's runtime: after each of its parallel regions (every GEMM) torch's
// OpenMP workers keep spinning for milliseconds (libgomp's GOMP_SPINCOUNT); threads of our own,
// started meanwhile, fight them for the cores, which on a 2-core machine made the attention
// kernel twice as slow inside the model as alone. Handing the chunks to the same, still-spinning
// workers removes both the contention and the thread start-up. Linking an OpenMP runtime of our
// own instead would put a second runtime in the process: oversubscription, or a crash.
#pragma once

#include <algorithm>
#include <cstdint>
#include <exception>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

namespace astromer_fast {
namespace cpu {

// The entry points of an OpenMP runtime, resolved with dlsym. GOMP_parallel is the GNU ABI that
// libgomp, LLVM's libomp and Intel's libiomp5 all export.
struct OpenMPRuntime {
  void (*parallel)(void (*fn)(void*), void* data, unsigned num_threads, unsigned flags);
  int (*thread_num)();
  int (*num_threads)();
  std::string path;
};

// The attached runtime, or nullptr (then std::thread is used).
const OpenMPRuntime* openmp_runtime();

// Attaches the OpenMP runtime that the library at `path` uses: the library must already be loaded
// in this process (nothing is loaded here), and the runtime is found the way its own calls find it
// (dlsym through its dependencies). Given torch's libtorch_cpu, that is exactly torch's runtime,
// even when another one (e.g. scikit-learn's) is loaded too. Returns the runtime's file; throws
// std::runtime_error saying why when there is none (the previous state is then kept).
std::string attach_openmp(const std::string& path);

// Back to std::thread workers.
void detach_openmp();

namespace detail {

template <class Fn>
struct ParallelJob {
  std::int64_t n, step, chunks;
  Fn* fn;
  std::vector<std::exception_ptr>* errors;
  const OpenMPRuntime* omp;

  void run(std::int64_t c) {
    const std::int64_t begin = c * step;
    const std::int64_t end = std::min(n, begin + step);
    if (begin >= end) return;
    try {
      (*fn)(begin, end);
    } catch (...) {
      (*errors)[static_cast<std::size_t>(c)] = std::current_exception();
    }
  }

  // Runs on every thread of the OpenMP team. The team may be smaller than asked for (nested
  // regions, limits), so each thread takes every nth chunk: all chunks run whatever its size.
  static void on_team_thread(void* self) {
    auto* job = static_cast<ParallelJob*>(self);
    const std::int64_t nth = std::max(1, job->omp->num_threads());
    for (std::int64_t c = job->omp->thread_num(); c < job->chunks; c += nth) job->run(c);
  }
};

}  // namespace detail

// Splits [0, n) into at most num_threads contiguous chunks of at least `grain` items and calls
// fn(begin, end) for each. The chunks depend only on n, grain and num_threads (never on which
// thread runs them), so a kernel that writes disjoint outputs per chunk gives the same bits either
// way. The first exception thrown by any chunk is rethrown here after all chunks have finished.
template <class Fn>
void parallel_for(std::int64_t n, std::int64_t grain, int num_threads, Fn&& fn) {
  if (n <= 0) return;
  grain = std::max<std::int64_t>(grain, 1);
  const std::int64_t max_chunks = (n + grain - 1) / grain;
  const std::int64_t chunks = std::max<std::int64_t>(1, std::min<std::int64_t>(num_threads, max_chunks));
  if (chunks == 1) {
    fn(std::int64_t{0}, n);
    return;
  }
  using F = std::remove_reference_t<Fn>;
  std::vector<std::exception_ptr> errors(static_cast<std::size_t>(chunks));
  detail::ParallelJob<F> job{n, (n + chunks - 1) / chunks, chunks, &fn, &errors, openmp_runtime()};
  if (job.omp != nullptr) {
    job.omp->parallel(&detail::ParallelJob<F>::on_team_thread, &job,
                      static_cast<unsigned>(chunks), 0u);
  } else {
    std::vector<std::thread> workers;
    workers.reserve(static_cast<std::size_t>(chunks - 1));
    for (std::int64_t c = 1; c < chunks; ++c) {
      // Running out of threads must not terminate the process: do that chunk here instead.
      try {
        workers.emplace_back([&job, c] { job.run(c); });
      } catch (...) {
        job.run(c);
      }
    }
    job.run(0);
    for (auto& th : workers) th.join();
  }
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

}  // namespace cpu
}  // namespace astromer_fast
