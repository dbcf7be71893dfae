// Host time of the pieces of one `hopper` launch, without torch (needs a GPU):
//
//   nvcc -O3 -std=c++17 -arch=sm_90a benchmarks/launch_cost.cu -o /tmp/launch_cost && /tmp/launch_cost
//
// Each line: µs per call over 20,000 back-to-back calls (synchronised once at the end), for the
// device query, encoding the four TMA tensor maps, and cudaLaunchKernelEx of an empty kernel with
// the hopper kernel's parameter size, shared memory and launch attributes (cluster, programmatic
// dependent launch). docs/notes.md (Host path) has what it measured.
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>
#include <chrono>
#include <cstdio>
struct Params { char bytes[176]; };
struct Maps { CUtensorMap q, k, v, o; };
struct Sched { char bytes[80]; };
__global__ void __launch_bounds__(384, 1) empty_kernel(const Params p, const __grid_constant__ Maps m, const Sched w) {
  if (p.bytes[0] == 123 && threadIdx.x == 999) printf("%d\n", w.bytes[0]);
}
__global__ void __launch_bounds__(384, 1) pdl_kernel(const Params p, const __grid_constant__ Maps m, const Sched w) {
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  asm volatile("griddepcontrol.wait;" ::: "memory");
  if (p.bytes[0] == 123 && threadIdx.x == 999) printf("%d\n", w.bytes[0]);
}
__global__ void tiny_kernel(int* x) { if (x && threadIdx.x == 999) *x = 1; }
template <class F> double time_us(F f, int n = 20000) {
  for (int i = 0; i < 200; ++i) f();
  cudaDeviceSynchronize();
  auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < n; ++i) f();
  cudaDeviceSynchronize();
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() / n;
}
int main() {
  void* fptr = nullptr; cudaDriverEntryPointQueryResult found;
  cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fptr, 12000, cudaEnableDefault, &found);
  auto encode = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fptr);
  void* buf; cudaMalloc(&buf, 1 << 24);
  cudaStream_t stream; cudaStreamCreate(&stream);
  Params p{}; Sched w{}; Maps maps{};
  auto make = [&](CUtensorMap* m) {
    cuuint64_t sizes[4] = {64, 512, 8, 1}, strides[3] = {128, 65536, 524288};
    cuuint32_t box[4] = {64, 128, 1, 1}, unit[4] = {1, 1, 1, 1};
    return encode(m, CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 4, buf, sizes, strides, box, unit, CU_TENSOR_MAP_INTERLEAVE_NONE,
                  CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  };
  printf("encode status %d\n", int(make(&maps.q)));
  const int smem = 200 * 1024;
  cudaFuncSetAttribute(empty_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  cudaFuncSetAttribute(pdl_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  auto launch = [&](auto kernel, int nattrs, int ctas, int shmem) {
    cudaLaunchConfig_t c = {}; cudaLaunchAttribute a[2];
    c.gridDim = dim3(ctas); c.blockDim = dim3(384); c.dynamicSmemBytes = shmem; c.stream = stream;
    a[0].id = cudaLaunchAttributeClusterDimension; a[0].val.clusterDim.x = 1; a[0].val.clusterDim.y = a[0].val.clusterDim.z = 1;
    a[1].id = cudaLaunchAttributeProgrammaticStreamSerialization; a[1].val.programmaticStreamSerializationAllowed = 1;
    c.attrs = a; c.numAttrs = nattrs;
    return cudaLaunchKernelEx(&c, kernel, p, maps, w);
  };
  int dev = 0, sms = 0;
  printf("%-58s %8.3f us\n", "cudaGetDevice + cudaDeviceGetAttribute(SMs)", time_us([&] { cudaGetDevice(&dev); cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev); }));
  printf("%-58s %8.3f us\n", "cuTensorMapEncodeTiled x4", time_us([&] { make(&maps.q); make(&maps.k); make(&maps.v); make(&maps.o); }));
  printf("%-58s %8.3f us\n", "cudaLaunchKernel tiny (1 CTA, 8-byte params), <<<>>>", time_us([&] { tiny_kernel<<<1, 32, 0, stream>>>(nullptr); }));
  printf("%-58s %8.3f us\n", "cudaLaunchKernelEx 64 CTAs, no attrs, no smem", time_us([&] { launch(empty_kernel, 0, 64, 0); }));
  printf("%-58s %8.3f us\n", "cudaLaunchKernelEx 64 CTAs, no attrs, 200 KB smem", time_us([&] { launch(empty_kernel, 0, 64, smem); }));
  printf("%-58s %8.3f us\n", "cudaLaunchKernelEx 64 CTAs, cluster attr, 200 KB", time_us([&] { launch(empty_kernel, 1, 64, smem); }));
  printf("%-58s %8.3f us\n", "cudaLaunchKernelEx 64 CTAs, cluster + PDL attrs, 200 KB", time_us([&] { launch(pdl_kernel, 2, 64, smem); }));
  printf("%-58s %8.3f us\n", "encode x4 + launch (cluster + PDL)", time_us([&] { make(&maps.q); make(&maps.k); make(&maps.v); make(&maps.o); launch(pdl_kernel, 2, 64, smem); }));
  return 0;
}
