// The sm_90a instructions the Hopper rung is built from, one small named helper each:
// mbarriers, TMA bulk tensor copies, warpgroup MMA (wgmma) and its shared-memory descriptors,
// register reallocation (setmaxnreg), named barriers and proxy fences.
//
// Shared-memory tiles use the 128-byte swizzle throughout: a tile of 16-bit elements is stored
// as column chunks of 64 elements (one 128-byte row each); inside a chunk, row r's 16-byte unit u
// sits at unit u ^ (r % 8). TMA writes and reads that layout (CU_TENSOR_MAP_SWIZZLE_128B) and
// wgmma descriptors describe it; every chunk starts on a 1024-byte boundary.
#pragma once

#include <cuda.h>  // CUtensorMap (a type only: the driver is reached at run time, not linked)
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace flashcore::sm90 {

constexpr int kWarpgroupThreads = 128;
constexpr int kSwizzleBytes = 128;        // one row of a chunk
constexpr int kChunkElems = 64;           // 16-bit elements per 128-byte row
constexpr int kSwizzleAtomBytes = 1024;   // 8 rows × 128 bytes: the swizzle pattern's period

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Byte offset of element (row, col) of a swizzled chunk (col < 64) from the chunk's start.
__device__ __forceinline__ uint32_t swizzled_offset(int row, int col) {
  const int unit = (col / 8) ^ (row % 8);
  return row * kSwizzleBytes + unit * 16 + (col % 8) * 2;
}

// ---- mbarrier ------------------------------------------------------------------------------
__device__ __forceinline__ void mbar_init(uint64_t* bar, int arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(arrivals));
}
// Makes initialised barriers visible to the other threads and to the TMA unit.
__device__ __forceinline__ void mbar_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(bar)) : "memory");
}
// The producer's arrival: the phase completes once `bytes` more have landed through TMA.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;"
               ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
}
// Waits until the phase with the given parity has completed. A fresh barrier counts its
// (never-run) phase of parity 1 as complete, so waiting for parity 1 first returns at once.
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done;
  do {
    asm volatile(
        "{ .reg .pred p;\n"
        "  mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "  selp.u32 %0, 1, 0, p; }"
        : "=r"(done) : "r"(smem_addr(bar)), "r"(parity) : "memory");
  } while (!done);
}

// ---- TMA (bulk tensor copies through a CUtensorMap) ----------------------------------------
// The maps are 4-D, innermost first: (head dim, sequence, head, batch).
__device__ __forceinline__ void tma_prefetch_map(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];" ::"l"(map) : "memory");
}
__device__ __forceinline__ void tma_load(void* dst, const CUtensorMap* map, uint64_t* bar,
                                         int col, int row, int head, int batch) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3, %4, %5}], [%6];"
      ::"r"(smem_addr(dst)), "l"(map), "r"(col), "r"(row), "r"(head), "r"(batch),
        "r"(smem_addr(bar)) : "memory");
}
// Rows outside the tensor are not written: a ragged last tile stores only its valid rows.
__device__ __forceinline__ void tma_store(const CUtensorMap* map, const void* src, int col,
                                          int row, int head, int batch) {
  asm volatile(
      "cp.async.bulk.tensor.4d.global.shared::cta.tile.bulk_group [%0, {%2, %3, %4, %5}], [%1];"
      ::"l"(map), "r"(smem_addr(src)), "r"(col), "r"(row), "r"(head), "r"(batch) : "memory");
}
__device__ __forceinline__ void tma_store_commit() {
  asm volatile("cp.async.bulk.commit_group;" ::: "memory");
}
// Waits until this thread's committed stores have finished reading shared memory.
__device__ __forceinline__ void tma_store_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
}
// Orders this thread's ordinary shared-memory writes before later async-proxy (TMA) reads.
__device__ __forceinline__ void fence_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

// ---- warp roles ------------------------------------------------------------------------------
__device__ __forceinline__ int warpgroup_index() {
  return __shfl_sync(0xffffffff, static_cast<int>(threadIdx.x) / kWarpgroupThreads, 0);
}
template <int kRegisters> __device__ __forceinline__ void regs_shrink_to() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(kRegisters));
}
template <int kRegisters> __device__ __forceinline__ void regs_grow_to() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(kRegisters));
}
// Barrier among `threads` threads (whole warps) on hardware barrier `id` (0 is __syncthreads).
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}
// Counts this warp's threads towards barrier `id` without waiting for it.
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

// ---- programmatic dependent launch (a launch attribute; no-ops without it) ------------------
// Lets the next kernel in the stream launch and run its own set-up while this one finishes.
__device__ __forceinline__ void allow_dependents_to_launch() {
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}
// Waits until the previous kernel in the stream has completed and its writes are visible: no
// global memory may be touched before it (the previous kernel may write our inputs, or still
// read memory that is our output).
__device__ __forceinline__ void wait_for_previous_grid() {
  asm volatile("griddepcontrol.wait;" ::: "memory");
}

// ---- thread-block clusters: distributed shared memory ----------------------------------------
// Every thread of every CTA of the cluster arrives; shared-memory writes before it are visible
// to the cluster's reads after it.
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release;\n\tbarrier.cluster.wait.acquire;" ::: "memory");
}
// The same without ordering memory: only that every thread got here (every CTA has started
// and, for instance, is done reading what the cluster overwrites next). The release above
// costs a GPU-scope memory barrier (MEMBAR.ALL.GPU).
__device__ __forceinline__ void cluster_sync_relaxed() {
  asm volatile("barrier.cluster.arrive.relaxed;\n\tbarrier.cluster.wait;" ::: "memory");
}
// The address of `local` (in this CTA's shared memory) in the shared memory of CTA `rank`.
__device__ __forceinline__ uint32_t cluster_addr(const void* local, int rank) {
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(smem_addr(local)), "r"(rank));
  return remote;
}
// Stores into another CTA's shared memory (visible to it after the next cluster_sync).
__device__ __forceinline__ void st_cluster(uint32_t addr, float x) {
  asm volatile("st.shared::cluster.f32 [%0], %1;" ::"r"(addr), "f"(x) : "memory");
}
__device__ __forceinline__ void st_cluster(uint32_t addr, float x, float y) {
  asm volatile("st.shared::cluster.v2.f32 [%0], {%1, %2};" ::"r"(addr), "f"(x), "f"(y) : "memory");
}

// ---- wgmma -----------------------------------------------------------------------------------
// Shared-memory matrix descriptor for a 128-byte-swizzled operand. Byte offsets:
//   K-major (rows of 64 contiguous K elements): stride = 1024, the step between 8-row groups;
//     the leading offset is unused. A K step of 16 elements advances the start by 32 bytes.
//   MN-major (rows are K, 64 contiguous MN elements): leading = the step between 64-element
//     MN chunks, stride = 1024, the step between groups of 8 K rows.
__device__ __forceinline__ uint64_t smem_desc(const void* start, uint32_t leading_bytes,
                                              uint32_t stride_bytes) {
  constexpr uint64_t kSwizzle128 = 1;
  return uint64_t((smem_addr(start) & 0x3FFFF) >> 4) |
         uint64_t((leading_bytes >> 4) & 0x3FFF) << 16 |
         uint64_t((stride_bytes >> 4) & 0x3FFF) << 32 | kSwizzle128 << 62;
}

// The descriptor of the same operand `bytes` further on: only the 14-bit start field changes,
// and it cannot carry out (shared addresses are below 256 KB), so one 32-bit add of a constant
// where recomputing the descriptor from the address is a chain of five uniform instructions.
__device__ __forceinline__ uint64_t desc_advance(uint64_t desc, uint32_t bytes) {
  return (desc & ~uint64_t(0xFFFFFFFF)) | uint32_t(uint32_t(desc) + (bytes >> 4));
}

__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
}
template <int kPending> __device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(kPending) : "memory");
}
// Keeps the compiler from moving accesses of accumulator registers across async wgmma work.
template <int kN> __device__ __forceinline__ void fence_registers(float (&r)[kN]) {
#pragma unroll
  for (int i = 0; i < kN; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
template <int kN> __device__ __forceinline__ void fence_registers(uint32_t (&r)[kN]) {
#pragma unroll
  for (int i = 0; i < kN; ++i) asm volatile("" : "+r"(r[i])::"memory");
}

// Accumulator fragment of a 64×N wgmma (fp32, N/2 registers per thread). For warp w of the
// warpgroup and lane l, register 4t + 2i + j holds row 16w + l/4 + 8i, column 8t + 2(l%4) + j.
// The same registers, rounded to 16 bits in pairs, are the A fragment of a following
// register-sourced wgmma with K = N: no data moves between threads.
//
// The wrappers, one overload per N (picked by the accumulator array's size), fp32 accumulation,
// scale_d = accumulate:
//   ss: D(64×N) (+)= A(64×16, smem, K-major) · B(16×N, smem, K-major)
//   rs: D(64×N) (+)= A(64×16, registers) · B(16×N, smem, MN-major)
// An asm template names its operands by number, so each N spells out its accumulator list
// (%0 … %N/2−1, from groups of 8) and the numbers of the operands after it.
#define FC_G0 "%0, %1, %2, %3, %4, %5, %6, %7"
#define FC_G1 "%8, %9, %10, %11, %12, %13, %14, %15"
#define FC_G2 "%16, %17, %18, %19, %20, %21, %22, %23"
#define FC_G3 "%24, %25, %26, %27, %28, %29, %30, %31"
#define FC_G4 "%32, %33, %34, %35, %36, %37, %38, %39"
#define FC_G5 "%40, %41, %42, %43, %44, %45, %46, %47"
#define FC_G6 "%48, %49, %50, %51, %52, %53, %54, %55"
#define FC_G7 "%56, %57, %58, %59, %60, %61, %62, %63"
#define FC_G8 "%64, %65, %66, %67, %68, %69, %70, %71"
#define FC_G9 "%72, %73, %74, %75, %76, %77, %78, %79"
#define FC_G10 "%80, %81, %82, %83, %84, %85, %86, %87"
#define FC_G11 "%88, %89, %90, %91, %92, %93, %94, %95"
#define FC_G12 "%96, %97, %98, %99, %100, %101, %102, %103"
#define FC_G13 "%104, %105, %106, %107, %108, %109, %110, %111"
#define FC_G14 "%112, %113, %114, %115, %116, %117, %118, %119"
#define FC_G15 "%120, %121, %122, %123, %124, %125, %126, %127"
#define FC_LIST32 FC_G0 ", " FC_G1 ", " FC_G2 ", " FC_G3
#define FC_LIST36 FC_LIST32 ", %32, %33, %34, %35"
#define FC_LIST40 FC_LIST32 ", " FC_G4
#define FC_LIST48 FC_LIST40 ", " FC_G5
#define FC_LIST64 FC_LIST48 ", " FC_G6 ", " FC_G7
#define FC_LIST80 FC_LIST64 ", " FC_G8 ", " FC_G9
#define FC_LIST88 FC_LIST80 ", " FC_G10
#define FC_LIST128 FC_LIST88 ", " FC_G11 ", " FC_G12 ", " FC_G13 ", " FC_G14 ", " FC_G15
#define FC_ACC8(i)                                                                         \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
      "+f"(d[i + 6]), "+f"(d[i + 7])
#define FC_ACC32 FC_ACC8(0), FC_ACC8(8), FC_ACC8(16), FC_ACC8(24)
#define FC_ACC36 FC_ACC32, "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35])
#define FC_ACC40 FC_ACC32, FC_ACC8(32)
#define FC_ACC48 FC_ACC40, FC_ACC8(40)
#define FC_ACC64 FC_ACC48, FC_ACC8(48), FC_ACC8(56)
#define FC_ACC80 FC_ACC64, FC_ACC8(64), FC_ACC8(72)
#define FC_ACC88 FC_ACC80, FC_ACC8(80)
#define FC_ACC128 FC_ACC88, FC_ACC8(88), FC_ACC8(96), FC_ACC8(104), FC_ACC8(112), FC_ACC8(120)
// ss: descriptors %A and %B; rs: A fragment %A0 … %A3 and descriptor %B; scale_d from %P.
#define FC_SS(TYPES, N, LIST, ACC, A, B, P)                                                      \
  static __device__ __forceinline__ void ss(float (&d)[N / 2], uint64_t a, uint64_t b,         \
                                            bool accumulate) {                                   \
    asm volatile("{ .reg .pred p; setp.ne.b32 p, %" #P ", 0;\n"                                 \
                 "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32" TYPES " {" LIST "}, %" #A      \
                 ", %" #B ", p, 1, 1, 0, 0; }"                                                  \
                 : ACC : "l"(a), "l"(b), "r"(int(accumulate)));                                  \
  }
#define FC_RS(TYPES, N, LIST, ACC, A0, A1, A2, A3, B, P)                                         \
  static __device__ __forceinline__ void rs(float (&d)[N / 2], const uint32_t (&a)[4],         \
                                            uint64_t b, bool accumulate) {                       \
    asm volatile("{ .reg .pred p; setp.ne.b32 p, %" #P ", 0;\n"                                 \
                 "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32" TYPES " {" LIST "}, {%" #A0    \
                 ", %" #A1 ", %" #A2 ", %" #A3 "}, %" #B ", p, 1, 1, 1; }"                       \
                 : ACC : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b),                     \
                   "r"(int(accumulate)));                                                        \
  }
template <typename T> struct Wgmma;
#define FC_DEFINE_WGMMA(ELEM, TYPES)                                          \
  template <> struct Wgmma<ELEM> {                                            \
    FC_SS(TYPES, 64, FC_LIST32, FC_ACC32, 32, 33, 34)                         \
    FC_SS(TYPES, 80, FC_LIST40, FC_ACC40, 40, 41, 42)                         \
    FC_SS(TYPES, 128, FC_LIST64, FC_ACC64, 64, 65, 66)                        \
    FC_SS(TYPES, 176, FC_LIST88, FC_ACC88, 88, 89, 90)                        \
    FC_RS(TYPES, 64, FC_LIST32, FC_ACC32, 32, 33, 34, 35, 36, 37)             \
    FC_RS(TYPES, 72, FC_LIST36, FC_ACC36, 36, 37, 38, 39, 40, 41)             \
    FC_RS(TYPES, 80, FC_LIST40, FC_ACC40, 40, 41, 42, 43, 44, 45)             \
    FC_RS(TYPES, 96, FC_LIST48, FC_ACC48, 48, 49, 50, 51, 52, 53)             \
    FC_RS(TYPES, 128, FC_LIST64, FC_ACC64, 64, 65, 66, 67, 68, 69)            \
    FC_RS(TYPES, 160, FC_LIST80, FC_ACC80, 80, 81, 82, 83, 84, 85)            \
    FC_RS(TYPES, 256, FC_LIST128, FC_ACC128, 128, 129, 130, 131, 132, 133)    \
  };
FC_DEFINE_WGMMA(__half, ".f16.f16")
FC_DEFINE_WGMMA(__nv_bfloat16, ".bf16.bf16")
#undef FC_DEFINE_WGMMA
#undef FC_SS
#undef FC_RS
#undef FC_G0
#undef FC_G1
#undef FC_G2
#undef FC_G3
#undef FC_G4
#undef FC_G5
#undef FC_G6
#undef FC_G7
#undef FC_G8
#undef FC_G9
#undef FC_G10
#undef FC_G11
#undef FC_G12
#undef FC_G13
#undef FC_G14
#undef FC_G15
#undef FC_LIST32
#undef FC_ACC32
#undef FC_LIST36
#undef FC_ACC36
#undef FC_LIST40
#undef FC_ACC40
#undef FC_LIST48
#undef FC_ACC48
#undef FC_LIST64
#undef FC_ACC64
#undef FC_LIST80
#undef FC_ACC80
#undef FC_LIST88
#undef FC_ACC88
#undef FC_LIST128
#undef FC_ACC128
#undef FC_ACC8

}  // namespace flashcore::sm90
