// llmlab's C shim over the few libtorch functions that tch 0.24 does not bind (issue 3):
// the fused AdamW kernel (`at::_fused_adamw_`) and autocast with a chosen dtype per device type.
//
// Conventions (as torch-sys's libtch/torch_api.cpp, `PROTECT`): a tensor handle is a
// `torch::Tensor*` (tch's `C_tensor`); every function catches C++ exceptions and returns NULL on
// success or a malloc'd error message, which the caller frees with `llmlab_free_error`. Nothing
// throws across the FFI boundary.
#include <ATen/autocast_mode.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/_foreach_add.h>
#include <ATen/ops/_foreach_zero.h>
#include <ATen/ops/_fused_adamw.h>

#include <cstdlib>
#include <cstring>
#include <exception>

#include "llmlab_protect.h"
#include <vector>

namespace {

// Device types of the Rust side: 0 = CPU, 1 = CUDA.
at::DeviceType device_type(int d) {
  switch (d) {
    case 0: return at::kCPU;
    case 1: return at::kCUDA;
    default: throw std::invalid_argument("llmlab shim: unknown device type code");
  }
}

// Floating dtypes of the Rust side: 0 = f32, 1 = bf16, 2 = f16.
at::ScalarType scalar_type(int k) {
  switch (k) {
    case 0: return at::kFloat;
    case 1: return at::kBFloat16;
    case 2: return at::kHalf;
    default: throw std::invalid_argument("llmlab shim: unknown dtype code");
  }
}

int scalar_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return 0;
    case at::kBFloat16: return 1;
    case at::kHalf: return 2;
    default: return -1;
  }
}

}  // namespace

// tch's C_tensor.
typedef at::Tensor *llmlab_tensor;

static std::vector<at::Tensor> tensor_list(const llmlab_tensor *ts, size_t n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    if (ts[i] == nullptr) throw std::invalid_argument("llmlab shim: null tensor handle");
    out.push_back(*ts[i]);  // a new handle to the same TensorImpl: in-place ops are shared
  }
  return out;
}

extern "C" {

void llmlab_free_error(char *err) { std::free(err); }

// One AdamW step over n parameters with libtorch's fused kernel (torch.optim.AdamW(fused=True)
// without amsgrad, maximize, grad_scale or found_inf). Every state_steps entry (a float scalar
// tensor on its parameter's device) is first set to `step`, the step count after this update:
// the kernel reads, never increments it (PyTorch increments it before the call).
char *llmlab_fused_adamw(const llmlab_tensor *params, const llmlab_tensor *grads,
                         const llmlab_tensor *exp_avgs, const llmlab_tensor *exp_avg_sqs,
                         const llmlab_tensor *state_steps, size_t n, double step, double lr,
                         double beta1, double beta2, double weight_decay, double eps) {
  LLMLAB_PROTECT({
    at::NoGradGuard no_grad;
    auto p = tensor_list(params, n);
    auto g = tensor_list(grads, n);
    auto m = tensor_list(exp_avgs, n);
    auto v = tensor_list(exp_avg_sqs, n);
    auto s = tensor_list(state_steps, n);
    at::_foreach_zero_(s);
    at::_foreach_add_(s, at::Scalar(step));
    std::vector<at::Tensor> max_exp_avg_sqs;  // amsgrad = false
    at::_fused_adamw_(p, g, m, v, max_exp_avg_sqs, s, lr, beta1, beta2, weight_decay, eps,
                      /*amsgrad=*/false, /*maximize=*/false);
  })
}

// Autocast state of one device type: enabled flag and lower-precision dtype (code above).
char *llmlab_autocast_get(int device, int *enabled, int *dtype) {
  LLMLAB_PROTECT({
    auto d = device_type(device);
    *enabled = at::autocast::is_autocast_enabled(d) ? 1 : 0;
    *dtype = scalar_code(at::autocast::get_autocast_dtype(d));
  })
}

// A negative dtype code leaves the dtype as it is.
char *llmlab_autocast_set(int device, int enabled, int dtype) {
  LLMLAB_PROTECT({
    auto d = device_type(device);
    if (dtype >= 0) at::autocast::set_autocast_dtype(d, scalar_type(dtype));
    at::autocast::set_autocast_enabled(d, enabled != 0);
  })
}

// Nesting depth after the change (torch.autocast's __enter__/__exit__ bookkeeping).
char *llmlab_autocast_increment_nesting(int *depth) {
  LLMLAB_PROTECT({ *depth = at::autocast::increment_nesting(); })
}

char *llmlab_autocast_decrement_nesting(int *depth) {
  LLMLAB_PROTECT({ *depth = at::autocast::decrement_nesting(); })
}

// Drops the casted-weight cache autocast keeps while enabled.
char *llmlab_autocast_clear_cache() { LLMLAB_PROTECT({ at::autocast::clear_cache(); }) }

}  // extern "C"

// libtorch's legacy operator profiler writing a chrome://tracing file (`bench generate
// --profile`): every dispatched operator with its CPU time, nested ones included.
#include <torch/csrc/autograd/profiler_legacy.h>

extern "C" {
char *llmlab_profile_start(const char *path, void **out) {
  LLMLAB_PROTECT({
    *out = new torch::autograd::profiler::RecordProfile(std::string(path));
  })
}

char *llmlab_profile_stop(void *profile) {
  LLMLAB_PROTECT({
    delete static_cast<torch::autograd::profiler::RecordProfile *>(profile);
  })
}
}
