// The CUDA op registrations (csrc/cuda/bindings_cuda.cpp) against the agreed op schemas, on a
// machine without a CUDA build of torch: the dispatcher infers each C++ kernel's schema when it
// meets the definition below and throws "Inferred operator schema ... doesn't match" on any
// difference. The definitions are the extension's own (csrc/schemas.h).
// Built only with -DROPEKERN_CUDA=ON -DROPEKERN_CUDA_SCHEMA_CHECK=ON (CMakeLists.txt).
#include <cstdio>

#include "bindings_cuda.cpp"
#include "../schemas.h"

TORCH_LIBRARY(ropekern, m) { ropekern::define_schemas(m); }

int main() {
  for (const char* name : {"ropekern::fwd", "ropekern::fwd_kvcache", "ropekern::apply_rope"}) {
    const auto op = c10::Dispatcher::singleton().findSchema({name, ""});
    if (!op.has_value() || !op->hasKernelForDispatchKey(c10::DispatchKey::CUDA)) {
      std::printf("FAIL %s has no CUDA kernel\n", name);
      return 1;
    }
    std::printf("ok %s\n", c10::toString(op->schema()).c_str());
  }
  return 0;
}
