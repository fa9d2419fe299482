// llmlab's C shim over libtorch's distributed engine, c10d (issue 19): a TCPStore for the
// rendezvous and a ProcessGroupGloo (CPU tensors) for the collectives of data-parallel training
// (book appendix A, DistributedDataParallel). Same conventions as llmlab_shim.cpp: tensor
// handles are `torch::Tensor*`, every function catches C++ exceptions and returns NULL or a
// malloc'd message that the caller frees with `llmlab_free_error` (c10 errors without their C++
// backtrace: a user reads them).
//
// The gloo headers are not in the torch wheel; src/shim/gloo_decl/ declares the names
// ProcessGroupGloo.hpp mentions (see its README). ProcessGroupNCCL is not bound yet.
#define USE_C10D_GLOO 1
#include <ATen/core/Tensor.h>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <exception>

#include "llmlab_protect.h"
#include <string>
#include <vector>

namespace {

// One process group: the store (kept alive: gloo's rendezvous and barriers go through it)
// and the backend.
struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
};

std::vector<at::Tensor> tensors_of(at::Tensor **ts, size_t n) {
  std::vector<at::Tensor> v;
  v.reserve(n);
  for (size_t i = 0; i < n; ++i) v.push_back(*ts[i]);
  return v;
}

// Starts one collective per tensor (gloo runs them on its worker threads), then waits for all.
template <typename F>
void each_and_wait(at::Tensor **ts, size_t n, F start) {
  std::vector<c10::intrusive_ptr<c10d::Work>> works;
  works.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    std::vector<at::Tensor> one{*ts[i]};
    works.push_back(start(one));
  }
  for (auto &w : works) w->wait();
}

}  // namespace

extern "C" {

// Joins the group `rank` of `world` whose rank 0 listens on `addr:port` (rank 0 starts the
// TCPStore server there). `iface`: a network interface for gloo (GLOO_SOCKET_IFNAME), or NULL:
// then `bind_host` (an address of this machine) or, when NULL too, the host name's address.
// Every wait (rendezvous, collectives) gives up after `timeout_ms`.
char *llmlab_dist_init_gloo(const char *addr, int port, int rank, int world, int64_t timeout_ms,
                            const char *iface, const char *bind_host, void **out) {
  LLMLAB_PROTECT({
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10d::TCPStoreOptions so;
    so.port = static_cast<std::uint16_t>(port);
    so.isServer = rank == 0;
    so.numWorkers = world;
    so.waitWorkers = true;
    so.timeout = timeout;
    auto store = c10::make_intrusive<c10d::TCPStore>(std::string(addr), so);
    auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
    if (iface != nullptr) {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(iface));
    } else if (bind_host != nullptr) {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(bind_host));
    } else {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    }
    auto pg = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, opts);
    *out = new Group{store, pg};
  })
}

void llmlab_dist_free(void *group) { delete static_cast<Group *>(group); }

// In-place all-reduce (sum) of each tensor across the group.
char *llmlab_dist_allreduce_sum(void *group, at::Tensor **ts, size_t n) {
  LLMLAB_PROTECT({
    auto *g = static_cast<Group *>(group);
    c10d::AllreduceOptions o;
    o.reduceOp = c10d::ReduceOp(c10d::ReduceOp::SUM);
    each_and_wait(ts, n, [&](std::vector<at::Tensor> &one) { return g->backend->allreduce(one, o); });
  })
}

// In-place broadcast of each tensor from `root`.
char *llmlab_dist_broadcast(void *group, at::Tensor **ts, size_t n, int root) {
  LLMLAB_PROTECT({
    auto *g = static_cast<Group *>(group);
    c10d::BroadcastOptions o;
    o.rootRank = root;
    each_and_wait(ts, n, [&](std::vector<at::Tensor> &one) { return g->backend->broadcast(one, o); });
  })
}

char *llmlab_dist_barrier(void *group) {
  LLMLAB_PROTECT({
    auto *g = static_cast<Group *>(group);
    g->backend->barrier(c10d::BarrierOptions())->wait();
  })
}

}  // extern "C"
