// How fast one SM takes in bytes from L2 into its shared memory, by path (needs a GPU):
//
//   nvcc -O3 -std=c++17 -arch=sm_90a benchmarks/intake.cu -o /tmp/intake && /tmp/intake
//
// One CTA per SM; each copies `bytes` (128 KB: the K and V one mission CTA reads) from an
// L2-resident buffer into its shared memory, groups of 8 CTAs reading the same bytes as the 8
// query tiles of a mission head do (or each its own). Paths: TMA bulk copies (16 KB each, all
// issued at once by one thread, completing on an mbarrier), cp.async 16-byte copies by W warps,
// or both, each taking a share of the bytes; then TMA through tensor maps as the hopper kernel
// loads K and V, by box size, swizzle and L2 promotion, and by the width of the rows under the
// boxes (head dims below 64: columns past the row zero-filled), and such rows by cp.async from
// one or four warps into the same swizzled layout. Each line: the median over CTAs and
// repeats of the cycles from the first issue to the last byte landed, and bytes per cycle per SM.
// docs/notes.md (Phase 3, "The mission's loads") has what it measured.
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <vector>

#include "../flashcore/csrc/hopper_ptx.cuh"  // the mbarrier helpers the hopper kernel uses

using namespace flashcore::sm90;

constexpr int kChunk = 16 * 1024;  // one TMA bulk copy

// The CTA's one mbarrier: one arrival, thread 0's, which also sets the bytes it waits for.
__device__ __forceinline__ void init_barrier(uint64_t* bar) {
  mbar_init(bar, 1);
  mbar_init_fence();
}

// tma_share: bytes (from the start) copied by TMA; the rest by cp.async from warps 1 .. warps.
__global__ void __launch_bounds__(384, 1)
    intake(const char* src, int bytes, int group, int tma_share, int warps, long long* cycles) {
  extern __shared__ __align__(1024) char smem[];
  __shared__ __align__(8) uint64_t bar;
  const char* base = src + size_t(blockIdx.x / group) * bytes;
  if (threadIdx.x == 0) init_barrier(&bar);
  __syncthreads();
  const long long start = clock64();
  if (threadIdx.x == 0) {
    mbar_arrive_expect_tx(&bar, tma_share);
    for (int off = 0; off < tma_share; off += kChunk)
      asm volatile(
          "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
          ::"r"(smem_addr(smem + off)), "l"(base + off), "r"(min(kChunk, tma_share - off)),
          "r"(smem_addr(&bar)) : "memory");
  }
  const int t = int(threadIdx.x) - 32, threads = warps * 32;
  if (t >= 0 && t < threads) {
    for (int off = tma_share + 16 * t; off < bytes; off += 16 * threads)
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem_addr(smem + off)), "l"(base + off)
                   : "memory");
    asm volatile("cp.async.wait_all;" ::: "memory");
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    mbar_wait(&bar, 0);
    cycles[blockIdx.x] = clock64() - start;
  }
}

// The same through a tensor map, as the hopper kernel loads K and V: a 2-D map over rows of 64
// 16-bit elements (128 bytes), boxes of `box_rows` rows (swizzle and L2 promotion per map).
__global__ void __launch_bounds__(384, 1)
    intake_tensor(const __grid_constant__ CUtensorMap map, int bytes, int group, int box_rows, long long* cycles) {
  extern __shared__ __align__(1024) char smem[];
  __shared__ __align__(8) uint64_t bar;
  const int row0 = (blockIdx.x / group) * (bytes / 128);
  if (threadIdx.x == 0) {
    init_barrier(&bar);
    tma_prefetch_map(&map);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    const long long start = clock64();
    mbar_arrive_expect_tx(&bar, bytes);
    for (int off = 0; off < bytes; off += box_rows * 128)
      asm volatile(
          "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];"
          ::"r"(smem_addr(smem + off)), "l"(&map), "r"(0), "r"(row0 + off / 128), "r"(smem_addr(&bar)) : "memory");
    mbar_wait(&bar, 0);
    cycles[blockIdx.x] = clock64() - start;
  }
}

// Rows of `dim` 16-bit elements (row pitch dim · 2 bytes) into 128-byte shared-memory rows,
// 128-byte swizzled as TMA would write them, by cp.async 16-byte copies from `warps` warps; the
// columns past `dim` are zero-filled (source size 0), as TMA fills a box past a narrow row.
__global__ void __launch_bounds__(384, 1)
    intake_rows(const char* src, int dim, int bytes, int group, int warps, long long* cycles) {
  extern __shared__ __align__(1024) char smem[];
  const int rows = bytes / 128, pitch = dim * 2;
  const char* base = src + size_t(blockIdx.x / group) * rows * pitch;
  __syncthreads();
  const long long start = clock64();
  const int t = threadIdx.x;
  if (t < warps * 32) {
    for (int i = t; i < rows * 8; i += warps * 32) {
      const int row = i / 8, chunk = i % 8;
      const int real = chunk * 16 < pitch ? 16 : 0;
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
                   ::"r"(smem_addr(smem + row * 128 + ((chunk ^ (row % 8)) * 16))),
                   "l"(base + size_t(row) * pitch + (real ? chunk * 16 : 0)), "r"(real) : "memory");
    }
    asm volatile("cp.async.wait_all;" ::: "memory");
  }
  __syncthreads();
  if (threadIdx.x == 0) cycles[blockIdx.x] = clock64() - start;
}

template <class Launch>
void report(const char* name, int bytes, int ctas, int group, long long* cycles, Launch launch) {
  constexpr int kRepeats = 5;
  std::vector<long long> all;
  for (int r = 0; r <= kRepeats; ++r) {  // the first run brings the bytes into L2
    launch();
    std::vector<long long> host(ctas);
    cudaMemcpy(host.data(), cycles, ctas * sizeof(long long), cudaMemcpyDeviceToHost);
    if (r > 0) all.insert(all.end(), host.begin(), host.end());
  }
  std::nth_element(all.begin(), all.begin() + all.size() / 2, all.end());
  const long long median = all[all.size() / 2];
  printf("%-34s %5d %6d %8lld %8.1f\n", name, ctas, group, median, double(bytes) / median);
}

int main() {
  constexpr int kBytes = 128 * 1024;
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  char* src;
  long long* cycles;
  cudaMalloc(&src, size_t(sms) * kBytes);
  cudaMemset(src, 1, size_t(sms) * kBytes);
  cudaMalloc(&cycles, sms * sizeof(long long));
  cudaFuncSetAttribute(intake, cudaFuncAttributeMaxDynamicSharedMemorySize, kBytes);
  printf("%-34s %5s %6s %8s %8s\n", "path", "CTAs", "group", "cycles", "B/cycle");
  struct Case { const char* name; int bytes, tma_share, warps; };
  const Case cases[] = {
      {"TMA, one 16 KB copy", kChunk, kChunk, 0},
      {"TMA", kBytes, kBytes, 0},
      {"cp.async, 3 warps", kBytes, 0, 3},
      {"cp.async, 8 warps", kBytes, 0, 8},
      {"TMA 1/2 + cp.async 3 warps", kBytes, kBytes / 2, 3},
      {"TMA 3/4 + cp.async 3 warps", kBytes, kBytes * 3 / 4, 3},
      {"TMA 1/2 + cp.async 8 warps", kBytes, kBytes / 2, 8},
  };
  for (const Case& c : cases)
    for (int ctas : {64, sms})
      for (int group : {8, 1})
        report(c.name, c.bytes, ctas, group, cycles, [&] {
          intake<<<ctas, 384, kBytes>>>(src, c.bytes, group, c.tma_share, c.warps, cycles);
        });
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult found;
  cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found);
  const auto encode = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  if (!encode) {
    printf("no cuTensorMapEncodeTiled in this driver\n");
    return 1;
  }
  cudaFuncSetAttribute(intake_tensor, cudaFuncAttributeMaxDynamicSharedMemorySize, kBytes);
  // A 2-D map over rows of `dim` 16-bit elements, loaded in boxes of 64 columns × box_rows
  // (columns past `dim` zero-filled), timed as `name`.
  const auto time_map = [&](const char* name, int dim, int box_rows, CUtensorMapSwizzle swizzle,
                            CUtensorMapL2promotion promotion) {
    CUtensorMap map;
    cuuint64_t sizes[2] = {cuuint64_t(dim), cuuint64_t(sms) * kBytes / 128};
    cuuint64_t strides[1] = {cuuint64_t(dim) * 2};
    cuuint32_t box[2] = {64, cuuint32_t(box_rows)}, unit[2] = {1, 1};
    if (encode(&map, CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 2, src, sizes, strides, box, unit,
               CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, promotion, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) !=
        CUDA_SUCCESS) {
      printf("encode failed\n");
      return;
    }
    for (int ctas : {64, sms})
      for (int group : {8, 1})
        report(name, kBytes, ctas, group, cycles, [&] {
          intake_tensor<<<ctas, 384, kBytes>>>(map, kBytes, group, box_rows, cycles);
        });
  };
  for (int box_rows : {64, 128, 256})
    for (auto promotion : {CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_L2_PROMOTION_NONE})
      for (auto swizzle : {CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_SWIZZLE_NONE}) {
        char name[64];
        snprintf(name, sizeof name, "tensor %d-row boxes%s%s", box_rows,
                 swizzle == CU_TENSOR_MAP_SWIZZLE_128B ? ", swizzled" : "",
                 promotion == CU_TENSOR_MAP_L2_PROMOTION_NONE ? ", no L2 promo" : "");
        time_map(name, 64, box_rows, swizzle, promotion);
      }
  // Head dims below 64, as the D=64 kernel loads them: rows of `dim` elements in global memory,
  // the same 64-column boxes, the columns past `dim` filled with zeros by TMA.
  for (int dim : {64, 56, 48, 40, 32}) {
    char name[64];
    snprintf(name, sizeof name, "tensor 128-row boxes of %d-col rows", dim);
    time_map(name, dim, 128, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B);
  }
  cudaFuncSetAttribute(intake_rows, cudaFuncAttributeMaxDynamicSharedMemorySize, kBytes);
  for (int dim : {64, 56, 40, 32})
    for (int warps : {1, 4}) {
      char name[64];
      snprintf(name, sizeof name, "cp.async %d-col rows, %d warp%s", dim, warps, warps > 1 ? "s" : "");
      for (int group : {8, 1})
        report(name, kBytes, sms, group, cycles, [&] {
          intake_rows<<<sms, 384, kBytes>>>(src, dim, kBytes, group, warps, cycles);
        });
    }
  const cudaError_t status = cudaDeviceSynchronize();
  if (status != cudaSuccess) printf("error: %s\n", cudaGetErrorString(status));
  return status != cudaSuccess;
}
