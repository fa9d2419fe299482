// What llmlab_dist.cpp (the c10d binding) and llmlab_nccl.cpp share: the NCCL backend is built
// in a file of its own, since its headers need CUDA's and take long to compile.
#pragma once

#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>

#include <chrono>

namespace llmlab {

// A ProcessGroupNCCL of `world` ranks over `store` (every wait gives up after `timeout`), or a
// c10::Error saying this build has no NCCL.
c10::intrusive_ptr<c10d::Backend> nccl_backend(const c10::intrusive_ptr<c10d::Store> &store,
                                               int rank, int world,
                                               std::chrono::milliseconds timeout);

}  // namespace llmlab
