// Building blocks shared by the CUDA rungs: element types, the online-softmax row state,
// causal/ragged masking, work decomposition and dispatch over dtype and head dim.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "attention.h"

namespace flashcore {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---- element types -------------------------------------------------------------------------
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float2 to_float2(__half2 x) { return __half22float2(x); }
__device__ __forceinline__ float2 to_float2(__nv_bfloat162 x) { return __bfloat1622float2(x); }
template <typename T> struct PairOf;  // two elements in one 32-bit register
template <> struct PairOf<__half> { using type = __half2; };
template <> struct PairOf<__nv_bfloat16> { using type = __nv_bfloat162; };
template <typename T> using Pair = typename PairOf<T>::type;
// Two floats rounded to the element type and packed in one 32-bit word (lower address first).
__device__ __forceinline__ unsigned pack2(__half, float a, float b) {
  const __half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<const unsigned*>(&h);
}
__device__ __forceinline__ unsigned pack2(__nv_bfloat16, float a, float b) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<const unsigned*>(&h);
}
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// ---- online softmax ------------------------------------------------------------------------
// Running max and sum of one query row, in the log2 domain (scores are pre-multiplied by
// scale·log2(e)). A row that has seen no key keeps max = -inf and sum = 0: its output is 0 and
// its LSE -inf. NaN scores propagate: fmaxf skips them, but their exp2 poisons the sum.
struct OnlineSoftmax {
  float max = -INFINITY;
  float sum = 0.f;

  // Raises the running max to cover `new_scores_max`; returns the factor by which everything
  // accumulated so far (the sum, done here, and the caller's output row) must be multiplied.
  __device__ __forceinline__ float rescale(float new_scores_max) {
    const float new_max = fmaxf(max, new_scores_max);
    const float correction = new_max == -INFINITY ? 1.f : exp2f(max - new_max);
    max = new_max;
    sum *= correction;
    return correction;
  }
  // Folds in the state of the same row over other keys; `mine` and `theirs` are the factors
  // for the output accumulated with this state and with `other`.
  __device__ __forceinline__ void merge(const OnlineSoftmax& other, float& mine, float& theirs) {
    const float new_max = fmaxf(max, other.max);
    mine = max == -INFINITY ? 0.f : exp2f(max - new_max);
    theirs = other.max == -INFINITY ? 0.f : exp2f(other.max - new_max);
    max = new_max;
    sum = sum * mine + other.sum * theirs;
  }
  // exp2(score - shift()) is a row's unnormalised probability; 0 for masked (-inf) scores.
  __device__ __forceinline__ float shift() const { return max == -INFINITY ? 0.f : max; }
  // The sum lies in [1, keys] once a key is seen (its largest term is 1), so the approximate
  // reciprocal (2 ulp, no special-case branches) is as good as a division here.
  __device__ __forceinline__ float output_scale() const { return sum == 0.f ? 0.f : __fdividef(1.f, sum); }
  __device__ __forceinline__ float lse() const {
    return sum == 0.f ? -INFINITY : (max + log2f(sum)) * kLn2;
  }
};

// ---- masking -------------------------------------------------------------------------------
// Number of keys query row `row` may see: all of them, or with causal masking (bottom-right
// aligned) keys 0 .. row + seqlen_k - seqlen_q. Clamped to [0, seqlen_k]; monotone in row.
__device__ __forceinline__ int visible_keys(const AttnParams& p, int row) {
  if (!p.causal) return p.seqlen_k;
  return max(0, min(p.seqlen_k, row + 1 + p.seqlen_k - p.seqlen_q));
}

// ---- work decomposition --------------------------------------------------------------------
// One CTA per (batch·head, query tile), flattened into a 1-D grid (no 65535 limit on batch·heads).
// Causal tiles run longest (last) first so short ones fill the tail of the wave.
struct TileCoord {
  int batch, head, head_kv, tile;
};
__device__ __forceinline__ TileCoord tile_coord(const AttnParams& p, int num_tiles) {
  const int bh = blockIdx.x / num_tiles;
  int tile = blockIdx.x % num_tiles;
  if (p.causal) tile = num_tiles - 1 - tile;
  const int head = bh % p.heads_q;
  return {bh / p.heads_q, head, head / (p.heads_q / p.heads_kv), tile};
}
template <typename T>
__device__ __forceinline__ const T* row_ptr(const void* base, const int64_t* stride, int b, int h,
                                            int s) {
  return static_cast<const T*>(base) + b * stride[0] + h * stride[1] + int64_t(s) * stride[2];
}

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

// n / d for 0 <= n < 2^31 by a divisor fixed for a launch, as a multiply-high and a shift
// (Granlund and Montgomery's round-up method): shift = ceil(log2 d), mul = floor(2^32 (2^shift
// - d) / d) + 1; then n / d = (umulhi(n, mul) + n) >> shift, no overflow below 2^31. A signed
// 32-bit division by a run-time value is ~20 dependent instructions on the GPU.
struct FastDiv {
  uint32_t mul, shift;
  FastDiv() = default;
  __host__ explicit FastDiv(int divisor) : shift(0) {
    while ((1u << shift) < uint32_t(divisor)) ++shift;
    mul = uint32_t(((uint64_t(1) << 32) * ((uint64_t(1) << shift) - divisor)) / divisor + 1);
  }
  __host__ __device__ __forceinline__ int div(int n) const {
#ifdef __CUDA_ARCH__
    const uint32_t high = __umulhi(uint32_t(n), mul);
#else
    const uint32_t high = uint32_t((uint64_t(uint32_t(n)) * mul) >> 32);
#endif
    return int((high + uint32_t(n)) >> shift);
  }
};

// ---- launch --------------------------------------------------------------------------------
// Lets kKernel use `bytes` of dynamic shared memory on `device`: the limit is a per-device
// attribute, raised on the device's first launch. (Host threads racing here set one value.)
template <auto kKernel>
cudaError_t allow_shared_memory(int bytes, int device) {
  static int configured_device = -1;
  if (configured_device == device) return cudaSuccess;
  const cudaError_t status =
      cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (status == cudaSuccess) configured_device = device;
  return status;
}

// ---- dispatch ------------------------------------------------------------------------------
template <typename T, int D>
struct KernelTag {
  using Elem = T;
  static constexpr int kHeadDim = D;
};
// Calls launch(KernelTag<T, D>{}) for the element type T named by p.dtype and the head dim D
// among kHeadDims equal to p.head_dim; cudaErrorInvalidValue when there is none.
template <int... kHeadDims, typename Launch>
cudaError_t dispatch(const AttnParams& p, Launch&& launch) {
  auto for_elem = [&](auto elem) {
    using T = decltype(elem);
    cudaError_t status = cudaErrorInvalidValue;
    (void)((p.head_dim == kHeadDims && (status = launch(KernelTag<T, kHeadDims>{}), true)) || ...);
    return status;
  };
  switch (p.dtype) {
    case DType::kFloat16: return for_elem(__half{});
    case DType::kBFloat16: return for_elem(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace flashcore
