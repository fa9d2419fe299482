// llmlab's C shim over libtorch's distributed engine, c10d (issue 19): a TCPStore for the
// rendezvous and a ProcessGroupGloo (CPU tensors) for the collectives of data-parallel training
// (book appendix A, DistributedDataParallel). Same conventions as llmlab_shim.cpp: tensor
// handles are `torch::Tensor*`, every function catches C++ exceptions and returns NULL or a
// malloc'd message that the caller frees with `llmlab_free_error` (c10 errors without their C++
// backtrace: a user reads them).
//
// The gloo headers are not in the torch wheel; src/shim/gloo_decl/ declares the names
// ProcessGroupGloo.hpp mentions (see its README). ProcessGroupNCCL (CUDA tensors) is created in
// llmlab_nccl.cpp; every collective below goes through the Backend interface either way.
#define USE_C10D_GLOO 1
#include <ATen/core/Tensor.h>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <exception>

#include "llmlab_dist.h"
#include "llmlab_protect.h"
#include <memory>
#include <mutex>
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

// DDP's reducer: the gradients are all-reduced in buckets while backward still runs. Each
// parameter carries a post-accumulate-grad hook (autograd calls it once its .grad holds this
// backward's gradient); when every parameter of a bucket has fired, the bucket's gradients are
// flattened and their all-reduce starts on gloo's threads. Buckets start strictly in index
// order (every rank must issue the collectives in the same order), so they are laid out in the
// order backward reaches them: the last parameters first. `finish` starts the buckets whose
// parameters got no gradient this time, waits for all, and writes the mean back into .grad.
// Only an armed reducer reacts (the last micro-batch of a step with gradient accumulation).
struct Reducer {
  Group *group;  // not owned: the Rust side keeps the group alive longer than the reducer
  int world;
  std::vector<std::vector<at::Tensor>> buckets;
  std::vector<size_t> ready;
  std::vector<at::Tensor> flats;
  std::vector<c10::intrusive_ptr<c10d::Work>> works;
  size_t next = 0;
  bool armed = false;
  std::string error;  // the first failure to start a collective inside a hook
  std::mutex mu;

  void launch(size_t b) {
    std::vector<at::Tensor> grads;
    for (auto &p : buckets[b]) {
      auto g = p.grad();
      grads.push_back(g.defined() ? g.reshape({-1}) : at::zeros({p.numel()}, p.options()));
    }
    flats[b] = at::cat(grads);
    std::vector<at::Tensor> one{flats[b]};
    c10d::AllreduceOptions o;
    o.reduceOp = c10d::ReduceOp(c10d::ReduceOp::SUM);
    works[b] = group->backend->allreduce(one, o);
  }

  // Starts every bucket from `next` on that is complete (or all of them, at the end).
  void launch_ready(bool all) {
    while (next < buckets.size() && (all || ready[next] == buckets[next].size())) {
      launch(next);
      ++next;
    }
  }

  void on_grad(size_t b) {
    std::lock_guard<std::mutex> lock(mu);
    if (!armed || !error.empty()) return;
    try {
      ++ready[b];
      launch_ready(false);
    } catch (const c10::Error &e) {
      error = e.what_without_backtrace();
    } catch (const std::exception &e) {
      error = e.what();
    }
  }

  void reset() {
    std::fill(ready.begin(), ready.end(), 0);
    for (auto &f : flats) f = at::Tensor();
    for (auto &w : works) w.reset();
    next = 0;
    armed = false;
    error.clear();
  }
};

struct ReadyHook : torch::autograd::PostAccumulateGradHook {
  std::shared_ptr<Reducer> reducer;
  size_t bucket;
  ReadyHook(std::shared_ptr<Reducer> r, size_t b) : reducer(std::move(r)), bucket(b) {}
  void operator()(const torch::autograd::Variable &) override { reducer->on_grad(bucket); }
};

struct ReducerHandle {
  std::shared_ptr<Reducer> reducer;
};

}  // namespace

extern "C" {

// The rendezvous: rank 0 serves a TCPStore at `addr:port`, the others connect to it.
static c10::intrusive_ptr<c10d::Store> make_store(const char *addr, int port, int rank, int world,
                                                  std::chrono::milliseconds timeout) {
  c10d::TCPStoreOptions so;
  so.port = static_cast<std::uint16_t>(port);
  so.isServer = rank == 0;
  so.numWorkers = world;
  so.waitWorkers = true;
  so.timeout = timeout;
  return c10::make_intrusive<c10d::TCPStore>(std::string(addr), so);
}

// Joins the group `rank` of `world` whose rank 0 listens on `addr:port` (rank 0 starts the
// TCPStore server there). `iface`: a network interface for gloo (GLOO_SOCKET_IFNAME), or NULL:
// then `bind_host` (an address of this machine) or, when NULL too, the host name's address.
// Every wait (rendezvous, collectives) gives up after `timeout_ms`.
char *llmlab_dist_init_gloo(const char *addr, int port, int rank, int world, int64_t timeout_ms,
                            const char *iface, const char *bind_host, void **out) {
  LLMLAB_PROTECT({
    auto timeout = std::chrono::milliseconds(timeout_ms);
    auto store = make_store(addr, port, rank, world, timeout);
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

// The same group over NCCL (CUDA tensors; rank r uses the GPU its tensors are on).
char *llmlab_dist_init_nccl(const char *addr, int port, int rank, int world, int64_t timeout_ms,
                            void **out) {
  LLMLAB_PROTECT({
    auto timeout = std::chrono::milliseconds(timeout_ms);
    auto store = make_store(addr, port, rank, world, timeout);
    auto pg = llmlab::nccl_backend(store, rank, world, timeout);
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

// A reducer over `params` (leaf tensors that require grad), cut into buckets of
// `sizes[0..nb]` consecutive tensors, in the order backward is expected to reach them.
char *llmlab_dist_reducer_new(void *group, at::Tensor **params, size_t n, const size_t *sizes,
                              size_t nb, int world, void **out) {
  LLMLAB_PROTECT({
    auto r = std::make_shared<Reducer>();
    r->group = static_cast<Group *>(group);
    r->world = world;
    size_t at = 0;
    for (size_t b = 0; b < nb; ++b) {
      std::vector<at::Tensor> bucket;
      for (size_t i = 0; i < sizes[b]; ++i) {
        TORCH_CHECK(at < n, "reducer: the bucket sizes add up to more than the parameters");
        bucket.push_back(*params[at++]);
      }
      r->buckets.push_back(std::move(bucket));
    }
    TORCH_CHECK(at == n, "reducer: the bucket sizes do not add up to the parameters");
    r->ready.assign(nb, 0);
    r->flats.resize(nb);
    r->works.resize(nb);
    for (size_t b = 0; b < nb; ++b) {
      for (auto &p : r->buckets[b]) {
        TORCH_CHECK(p.requires_grad() && p.is_leaf(), "reducer: a parameter is not a leaf that requires grad");
        torch::autograd::impl::set_post_acc_grad_hooks(p, std::make_unique<ReadyHook>(r, b));
      }
    }
    *out = new ReducerHandle{r};
  })
}

// The next backward's gradients are the step's (the last micro-batch): start reducing them.
void llmlab_dist_reducer_arm(void *handle) {
  auto &r = *static_cast<ReducerHandle *>(handle)->reducer;
  std::lock_guard<std::mutex> lock(r.mu);
  r.reset();
  r.armed = true;
}

// After backward: starts what is left, waits for every bucket, and replaces each gradient by
// its mean over the ranks. A parameter without a gradient keeps none.
char *llmlab_dist_reducer_finish(void *handle) {
  auto &r = *static_cast<ReducerHandle *>(handle)->reducer;
  std::lock_guard<std::mutex> lock(r.mu);
  LLMLAB_PROTECT({
    struct Reset {
      Reducer &r;
      ~Reset() { r.reset(); }
    } reset{r};
    TORCH_CHECK(r.armed, "reducer: finish without arm");
    TORCH_CHECK(r.error.empty(), r.error);
    r.launch_ready(true);
    at::NoGradGuard no_grad;
    for (size_t b = 0; b < r.buckets.size(); ++b) {
      r.works[b]->wait();
      auto mean = r.flats[b].div_(r.world);
      int64_t at = 0;
      for (auto &p : r.buckets[b]) {
        int64_t k = p.numel();
        auto g = p.grad();
        if (g.defined()) g.copy_(mean.narrow(0, at, k).view(g.sizes()));
        at += k;
      }
    }
  })
}

void llmlab_dist_reducer_free(void *handle) {
  auto *h = static_cast<ReducerHandle *>(handle);
  for (auto &bucket : h->reducer->buckets) {
    for (auto &p : bucket) torch::autograd::impl::set_post_acc_grad_hooks(p, nullptr);
  }
  delete h;
}

char *llmlab_dist_barrier(void *group) {
  LLMLAB_PROTECT({
    auto *g = static_cast<Group *>(group);
    g->backend->barrier(c10d::BarrierOptions())->wait();
  })
}

}  // extern "C"
