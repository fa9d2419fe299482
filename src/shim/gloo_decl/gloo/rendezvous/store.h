// Declarations only (see gloo_decl/README): the virtual interface that c10d's inline
// `GlooStore` overrides, so that ProcessGroupGloo.hpp compiles. llmlab never constructs a
// GlooStore (libtorch's ProcessGroupGloo constructor does, with its own gloo), so no vtable of
// this class is emitted here. GLOO_STORE_HAS_STORE_V2 stays undefined.
#pragma once
#include <chrono>
#include <string>
#include <vector>
namespace gloo {
namespace rendezvous {
class Store {
 public:
  virtual ~Store() = default;
  virtual void set(const std::string& key, const std::vector<char>& data) = 0;
  virtual std::vector<char> get(const std::string& key) = 0;
  virtual void wait(const std::vector<std::string>& keys) = 0;
  virtual void wait(const std::vector<std::string>& keys,
                    const std::chrono::milliseconds& timeout) = 0;
};
}  // namespace rendezvous
}  // namespace gloo
