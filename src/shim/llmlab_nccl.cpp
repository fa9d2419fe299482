// ProcessGroupNCCL for llmlab's c10d binding (issue 19): data-parallel ranks on CUDA GPUs. Its
// header needs CUDA's runtime headers (nvidia-cuda-runtime, nvidia-cuda-crt, nvidia-cuda-cccl)
// and nccl.h (nvidia-nccl-cu13) from the venv; build.rs compiles this file with
// LLMLAB_WITH_NCCL only when it finds them all, and a build without them refuses a CUDA group
// with a message that says what is missing. The symbols themselves are libtorch_cuda.so's.
#include "llmlab_dist.h"

#ifdef LLMLAB_WITH_NCCL
#define USE_C10D_NCCL 1
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

namespace llmlab {

c10::intrusive_ptr<c10d::Backend> nccl_backend(const c10::intrusive_ptr<c10d::Store> &store,
                                               int rank, int world,
                                               std::chrono::milliseconds timeout) {
#ifdef LLMLAB_WITH_NCCL
  auto opts = c10d::ProcessGroupNCCL::Options::create();
  opts->timeout = timeout;
  return c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, opts);
#else
  (void)store;
  (void)rank;
  (void)world;
  (void)timeout;
  TORCH_CHECK(false,
              "this llmlab was built without NCCL (build.rs found no nccl.h and CUDA runtime "
              "headers in the venv's nvidia packages); data-parallel ranks on CUDA need it");
#endif
}

}  // namespace llmlab

extern "C" int llmlab_nccl_built() {
#ifdef LLMLAB_WITH_NCCL
  return 1;
#else
  return 0;
#endif
}
