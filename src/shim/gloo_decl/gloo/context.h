// Declarations only (see gloo_decl/README): the pip wheel of torch ships ProcessGroupGloo.hpp
// but not the gloo headers it includes. llmlab never instantiates a gloo type, it only names
// them; `setTimeout` is named by an inline function of ProcessGroupGloo that llmlab never calls.
#pragma once
#include <chrono>
namespace gloo {
class Context {
 public:
  void setTimeout(std::chrono::milliseconds timeout);
};
}  // namespace gloo
