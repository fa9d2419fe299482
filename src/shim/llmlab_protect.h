// The FFI error convention shared by llmlab's shim files (as torch-sys's libtch `PROTECT`):
// every exported function returns NULL on success or a malloc'd message the Rust side frees with
// `llmlab_free_error`; no C++ exception crosses the FFI boundary. c10::Error reports its message
// without libtorch's C++ backtrace.
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <exception>

namespace llmlab {

inline char *dup_error(const char *msg) {
  char *s = static_cast<char *>(std::malloc(std::strlen(msg) + 1));
  if (s != nullptr) std::strcpy(s, msg);
  return s;
}

}  // namespace llmlab

#define LLMLAB_PROTECT(...)                                 \
  try {                                                     \
    __VA_ARGS__                                             \
    return nullptr;                                         \
  } catch (const c10::Error &e) {                           \
    return llmlab::dup_error(e.what_without_backtrace());   \
  } catch (const std::exception &e) {                       \
    return llmlab::dup_error(e.what());                     \
  } catch (...) {                                           \
    return llmlab::dup_error("unknown C++ exception");      \
  }
