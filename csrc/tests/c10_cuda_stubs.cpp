// Stand-ins for the libc10_cuda symbols that csrc/cuda/bindings_cuda.cpp references, so that the
// schema check (test_cuda_schemas.cpp) links and loads against a CPU-only build of torch, which
// ships the c10/cuda headers but not the library. None is ever called; each aborts if it were.
// Only for ROPEKERN_CUDA_SCHEMA_CHECK=ON with a CPU torch; the declarations follow torch 2.13.
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <cstdlib>

namespace c10::cuda {
namespace CUDACachingAllocator {
std::atomic<CUDAAllocator*> allocator;
}
bool CUDAStream::query() const { std::abort(); }
cudaStream_t CUDAStream::stream() const { std::abort(); }
void CUDAStream::synchronize() const { std::abort(); }
DeviceIndex ExchangeDevice(DeviceIndex) { std::abort(); }
cudaError_t GetDevice(DeviceIndex*) { std::abort(); }
cudaError_t MaybeSetDevice(DeviceIndex) { std::abort(); }
cudaError_t SetDevice(DeviceIndex, bool) { std::abort(); }
void c10_cuda_check_implementation(const int32_t, const char*, const char*, const uint32_t, const bool) { std::abort(); }
DeviceIndex device_count() noexcept { std::abort(); }
CUDAStream getCurrentCUDAStream(DeviceIndex) { std::abort(); }
CUDAStream getDefaultCUDAStream(DeviceIndex) { std::abort(); }
CUDAStream getStreamFromPool(const bool, DeviceIndex) { std::abort(); }
CUDAStream getStreamFromPool(const int, DeviceIndex) { std::abort(); }
void setCurrentCUDAStream(CUDAStream) { std::abort(); }
}  // namespace c10::cuda
